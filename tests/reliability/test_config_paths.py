"""Every local path a config names is checked before any shard is read, at ``validate``
and ``run`` (issue 14, finding 7), and relative paths resolve against the config file's
folder (issue 17; SPEC, "Config")."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, SAMPLE, run_cli, run_cli_subprocess, write_config

pytestmark = pytest.mark.slow  # runs the CLI or loads the model

MISSING = [
    ({"filters": [{"uids": {"path": "{tmp}/no_uids.npy"}}]}, "filters[0].uids.path"),
    (
        {"filters": [{"not": {"decontaminate": {"reference": "{tmp}/no_eval_set", "method": "perceptual"}}}]},
        "filters[0].not.decontaminate.reference",
    ),
    (
        {
            "filters": [{"any": [{"clip_score": {"min": 0.1}}, {"image_clusters": {}}]}],
            "clusters": {
                "num_clusters": 4,
                "reference": "sample_data/reference",
                "centroids": "{tmp}/no_centroids.npy",
            },
        },
        "clusters.centroids",
    ),
    (
        {"filters": [{"image_clusters": {}}], "clusters": {"num_clusters": 4, "reference": "{tmp}/ref_{0..2}.npy"}},
        "clusters.reference",
    ),
    ({"model": {"arch": "poolsift-tiny", "pretrained": "{tmp}/weights/tiny.safetensors"}}, "model.pretrained"),
    (
        {"scorers": [{"embedding_head": {"name": "q", "preset": "mlp", "weights": "{tmp}/no_head.safetensors"}}]},
        "scorers[0].embedding_head.weights",
    ),
]


def _fill(sections: dict, tmp) -> dict:
    return yaml.safe_load(yaml.safe_dump(sections).replace("{tmp}", str(tmp)))


@pytest.mark.parametrize(("sections", "key"), MISSING, ids=[k for _, k in MISSING])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_missing_file_is_exit_2_before_any_shard_is_read(tmp_path, sections, key, command):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", **_fill(sections, tmp_path), output={"dir": str(out)})
    code, _, err = run_cli(command, cfg, *(["--quiet"] if command == "run" else []))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"poolsift: error: {key}: no such file or folder "), err
    assert not out.exists(), "nothing scored, cached or written before the check"


def test_one_missing_member_of_a_brace_range_is_named(tmp_path):
    for i in (0, 2):
        np.save(tmp_path / f"ref_{i}.npy", np.zeros((1, 4), np.float32))
    sections = _fill(MISSING[3][0], tmp_path)
    cfg = write_config(tmp_path / "c.yaml", **sections)
    code, _, err = run_cli("validate", cfg)
    assert code == 2
    assert err.strip() == f"poolsift: error: clusters.reference: no such file or folder '{tmp_path}/ref_1.npy'"


def copied_sample_config(folder, shards=4):
    """configs/sample.yaml, its model and the first ``shards`` shards of its pool copied
    beside it, paths relative to it (the shards as a brace range)."""
    (folder / "pool").mkdir(parents=True)
    for i in range(shards):
        shutil.copy(SAMPLE / "pool" / f"{i:05d}.tar", folder / "pool")
    shutil.copy(SAMPLE / "tiny_clip" / "poolsift-tiny.safetensors", folder / "tiny.safetensors")
    cfg = yaml.safe_load((REPO / "configs" / "sample.yaml").read_text())
    cfg["input"]["shards"] = f"pool/{{00000..{shards - 1:05d}}}.tar"
    cfg["model"]["pretrained"] = "tiny.safetensors"
    cfg["output"]["dir"] = "out"
    (folder / "sample.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "sample.yaml"


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    """``validate`` in a process started elsewhere (it loads no model: cheap); ``run`` in this
    process from that folder (a second interpreter that loads torch and open_clip was 13-18 s
    of CI), on two of the sample's shards, still named by a relative brace range."""
    config = copied_sample_config(tmp_path / "project", shards=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli_subprocess(
        "validate", config, cwd=elsewhere, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stderr
    assert f"output to {tmp_path}/project/out" in proc.stdout
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli("run", config, "--quiet")
    assert code == 0, err
    manifest = json.loads((tmp_path / "project" / "out" / "manifest.json").read_text())
    pool = tmp_path / "project" / "pool"
    assert [i["path"] for i in manifest["inputs"]] == [str(pool / "00000.tar"), str(pool / "00001.tar")]
    assert (tmp_path / "project" / "out" / "subset.npy").is_file()
    assert not os.listdir(elsewhere)


def test_a_copied_config_whose_model_is_not_beside_it_fails_validate(tmp_path):
    config = copied_sample_config(tmp_path / "project")
    (tmp_path / "project" / "tiny.safetensors").unlink()
    code, _, err = run_cli("validate", config)
    assert code == 2
    assert err.strip() == (
        "poolsift: error: model.pretrained: no such file or folder 'tiny.safetensors' "
        f"(relative paths resolve against the config's folder, {tmp_path}/project/)"
    )


def test_a_scorers_placeholder_weights_name_the_set_that_replaces_them(tmp_path):
    """docs/config.md's scorer example, copied as written (``weights: path/to/...``): the
    placeholder is named as the presets' are, not as a weights file not found."""
    text = (REPO / "configs" / "sample_quality.yaml").read_text().replace("../sample_data", str(SAMPLE))
    text = text.replace(f"{SAMPLE}/heads/poolsift-watermark.safetensors", "path/to/head.safetensors")
    (tmp_path / "c.yaml").write_text(text)
    code, _, err = run_cli("validate", tmp_path / "c.yaml")
    assert code == 2
    key = "scorers[0].embedding_head.weights"
    assert err.strip() == (
        f"poolsift: error: {key}: 'path/to/head.safetensors' is a placeholder: "
        f"point it at your data with --set {key}=... (or in a copy of the config)"
    )


def test_a_shard_path_relative_to_the_wrong_folder_names_the_config_folder_and_the_missing_folder(
    tmp_path, monkeypatch
):
    """Written as ``../sample_data/...`` in a config one folder too deep: the message keeps the
    ``..`` as written, names the folder it resolved against, and names the missing folder
    itself rather than its first expanded file."""
    (tmp_path / "project" / "configs").mkdir(parents=True)
    config = tmp_path / "project" / "configs" / "c.yaml"
    config.write_text("input: {shards: '../sample_data/pool/{00000..00003}.tar'}\nfilters: []\n")
    monkeypatch.chdir(tmp_path / "project")
    code, _, err = run_cli("validate", "configs/c.yaml")
    assert code == 2
    assert err.strip() == (
        "poolsift: error: input.shards: no shards found at '../sample_data/pool/{00000..00003}.tar': "
        "no folder '../sample_data/pool' (relative paths resolve against the config's folder, configs/)"
    )
    (tmp_path / "project" / "sample_data" / "pool").mkdir(parents=True)
    (tmp_path / "project" / "sample_data" / "pool" / "00000.tar").touch()
    code, _, err = run_cli("validate", "configs/c.yaml")  # the folder is there now, one shard of four
    assert err.strip() == (
        "poolsift: error: input.shards: no shards found at '../sample_data/pool/00001.tar' "
        "(relative paths resolve against the config's folder, configs/)"
    )


def test_set_and_output_paths_stay_relative_to_the_working_directory(tmp_path, monkeypatch):
    from pipelines.config import load_config

    config = copied_sample_config(tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config, ["output.dir=mine"])
    assert cfg.output.dir == "mine"
    assert cfg.input.shards == "project/pool/{00000..00003}.tar"  # under the working directory: kept relative
    assert cfg.model.pretrained == "project/tiny.safetensors"


def test_tags_are_not_paths(tmp_path):
    from pipelines.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "input": {"shards": "s3://bucket/{0..3}.tar"},
                "model": {"arch": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
            }
        )
    )
    cfg = load_config(path)
    assert cfg.model.pretrained == "laion2b_s34b_b79k"
    assert cfg.input.shards == "s3://bucket/{0..3}.tar"


def test_home_paths_and_optional_models(tmp_path):
    """``~`` paths are the user's home, not the config's folder; a missing fastText model
    is not a config error, with or without a fallback: the run downloads it first."""
    from pipelines.config import load_config

    for name in ["tiny.safetensors", "pool.tar"]:
        (tmp_path / name).touch()
    language = {"languages": ["en"], "backend": "fasttext", "model_path": "~/no/such/lid.176.bin"}
    raw = {
        "input": {"shards": "pool.tar"},
        "model": {"arch": "poolsift-tiny", "pretrained": "tiny.safetensors"},
        "filters": [{"language": {**language, "fallback": ["py3langid"]}}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).filters[0]["language"]["model_path"] == "~/no/such/lid.176.bin"
    code, _, err = run_cli("validate", path)
    assert code == 0, err
    raw["filters"] = [{"language": language}]
    path.write_text(yaml.safe_dump(raw))
    code, _, err = run_cli("validate", path)
    assert code == 0, err
