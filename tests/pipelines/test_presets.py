"""Every YAML in configs/ loads and validates, without touching any data (new presets are
picked up automatically)."""

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli

PRESETS = sorted((REPO / "configs").glob("*.yaml"))
DATACOMP_BASELINES = ["no_filter", "basic_filter", "text_based", "clip_score_l14_30pct", "laion2b"]


def _no_data(*args, **kwargs):
    raise AssertionError("poolsift validate touched data")


@pytest.fixture
def no_data_access(monkeypatch):
    """Listing or opening any file through fsspec, or hashing the model checkpoint, fails
    the test. (Every input path goes through fsspec: filtering.io.paths.)"""
    import importlib
    import pkgutil

    import fsspec

    import filtering.stages
    import pipelines.runner  # noqa: F401  (imported before patching, as a real run would be)

    for mod in pkgutil.iter_modules(filtering.stages.__path__, "filtering.stages."):
        importlib.import_module(mod.name)
    import filtering.stages.webdataset as score

    monkeypatch.setattr(fsspec.core, "url_to_fs", _no_data)
    monkeypatch.setattr(fsspec, "open", _no_data)
    monkeypatch.setattr(fsspec, "filesystem", _no_data)
    monkeypatch.setattr(score, "model_spec", _no_data)


def placeholders(preset: Path, root: Path) -> list[str]:
    """``--set`` overrides pointing each placeholder path (``path/to/...``) of ``preset``
    at stand-ins created under ``root``, so validate finds every input it names."""
    import braceexpand

    from pipelines.config import config_paths, expand_local, load_raw

    overrides = []
    for key, container, k in config_paths(load_raw(preset)):
        value = container[k]
        if key == "output.dir" or all(found for _, found in expand_local(value)):
            continue
        stand_in = str(root / key.replace("[", "_").replace("]", "") / Path(value).name)
        for one in braceexpand.braceexpand(stand_in):
            Path(one).parent.mkdir(parents=True, exist_ok=True)
            Path(one).mkdir() if key == "input.datacomp_metadata" else Path(one).touch()
        overrides += ["--set", f"{key}={stand_in}"]
    return overrides


def placeholder_value(preset: Path, key: str) -> str:
    """The value at ``key`` (``input.datacomp_metadata``) as the preset's file writes it."""
    node = yaml.safe_load(preset.read_text())
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_validates_without_reading_data(preset: Path, no_data_access, tmp_path):
    stand_ins = placeholders(preset, tmp_path)
    code, out, err = run_cli("validate", preset, *stand_ins)
    assert code == 0, err
    assert out.startswith(f"{preset}: OK")
    if stand_ins:  # as shipped, the placeholders are reported: one line naming the key
        code, out, err = run_cli("validate", preset)
        assert code == 2
        key = next(stand_ins[i + 1].split("=")[0] for i in range(0, len(stand_ins), 2))
        assert err.strip() == (
            f"poolsift: error: {key}: '{placeholder_value(preset, key)}' is a placeholder: "
            f"point it at your data with --set {key}=... (or in a copy of the config)"
        ), err


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_parses_into_a_filter_tree(preset: Path):
    from pipelines.config import load_config

    cfg = load_config(preset)
    described = [node.describe() for node in cfg.filter_tree]
    assert len(described) == len(cfg.filters)
    assert cfg.output.dir.startswith("runs/")  # relative to the config's folder: ../runs/


def test_datacomp_baselines_are_shipped():
    names = {p.stem for p in PRESETS}
    assert set(DATACOMP_BASELINES) <= names
    from pipelines.config import load_config

    for name in DATACOMP_BASELINES:
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.input.datacomp_metadata
    laion = load_config(REPO / "configs" / "laion2b.yaml")
    assert [n.label() for n in laion.filter_tree] == ["clip_score", "language"]
    assert laion.filter_tree[0].filter.params.min == 0.28
    assert laion.filter_tree[0].filter.field == "clip_b32_similarity_score"
    basic = load_config(REPO / "configs" / "basic_filter.yaml")
    params = {n.label(): n.filter.params for n in basic.filter_tree}
    assert (params["caption"].min_words, params["caption"].min_chars) == (3, 6)
    assert (params["image_size"].min_side, params["image_size"].max_aspect_ratio) == (200, 3.0)
    assert params["language"].languages == ["en"]
