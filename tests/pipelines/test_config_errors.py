"""Every config mistake is one line naming the key, exit 2, and no traceback."""

import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)

BASE = {
    "input": {"shards": "/nonexistent/pool/{00000..00003}.tar"},
    "model": {"arch": "poolsift-tiny", "pretrained": "/nonexistent/tiny.safetensors"},
    "filters": [
        {"caption": {"min_words": 3, "min_chars": 6}},
        {"any": [{"image_size": {"min_side": 64}}, {"not": {"language": {"languages": ["en"]}}}]},
        {"clip_score": {"top_fraction": 0.3}},
    ],
}


def check(tmp_path, config, *args, command="validate"):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False) if isinstance(config, dict) else config)
    extra = ("--output", str(tmp_path / "out"), "--quiet") if command == "run" else ()
    code, out, err = run_cli(command, path, *extra, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("poolsift: error: ")
    return lines[0].removeprefix("poolsift: error: ")


def test_base_config_is_valid(tmp_path):
    path = tmp_path / "config.yaml"
    relative = {
        **BASE,
        "input": {"shards": "pool/{00000..00003}.tar"},
        "model": {**BASE["model"], "pretrained": "tiny.safetensors"},
    }
    path.write_text(yaml.safe_dump(relative))
    (tmp_path / "pool").mkdir()
    for name in ["tiny.safetensors", *(f"pool/0000{i}.tar" for i in range(4))]:
        (tmp_path / name).touch()
    code, out, err = run_cli("validate", path)  # paths relative to the config's folder
    assert code == 0, err
    assert "OK (4 filters" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # misspelled keys, at any depth
        (
            "filters[2].clip_score.top_fracton=0.3",
            "filters[2].clip_score.top_fracton: unknown key; did you mean top_fraction?",
        ),
        (
            "filters[1].any[0].image_size.min_sid=3",
            "filters[1].any[0].image_size.min_sid: unknown key; did you mean min_side?",
        ),
        (
            "filters[1].any[1].not.language.langauges=[en]",
            "filters[1].any[1].not.language.langauges: unknown key; did you mean languages?",
        ),
        ("model.archh=ViT-B-32", "model.archh: unknown key; did you mean arch?"),
        ("output.drop=false", "output.drop: unknown key; did you mean dropped?"),
        # wrong types
        (
            "filters[2].clip_score.top_fraction=lots",
            "filters[2].clip_score.top_fraction: Input should be a valid number",
        ),
        ("filters[0].caption=3", "filters[0].caption: expected a mapping of keys to values (got 3)"),
        ("output.dropped=maybe", "output.dropped: Input should be a valid boolean"),
        ("input.shards=3", "input.shards: expected str or list[str] (got 3)"),
        # decoders by allow-list (issue 23): never EPS, and the choices named
        (
            "input.image_formats=[JPEG, EPS]",
            "input.image_formats: unknown image format 'EPS'; valid: BMP, GIF, JPEG, PNG, TIFF, WEBP",
        ),
        (
            "input.image_formats=[]",
            "input.image_formats: must be a non-empty list of image formats from BMP, GIF, JPEG, PNG, TIFF, WEBP",
        ),
        ("filters={clip_score: {min: 0.2}}", "filters: Input should be a valid list"),
        # unknown filter names list the valid ones
        (
            "filters[0]={captions: {min_words: 2}}",
            "filters[0]: unknown filter 'captions'; did you mean caption? valid filters: ",
        ),
        ("filters[1].any[1].not={lang: {}}", "filters[1].any[1].not: unknown filter 'lang'; "),
        # impossible values
        (
            "filters[2].clip_score.top_fraction=1.5",
            "filters[2].clip_score.top_fraction: Input should be less than or equal to 1 (got 1.5)",
        ),
        (
            "filters[1].any[0].image_size.min_side=0",
            "filters[1].any[0].image_size.min_side: Input should be greater than or equal to 1",
        ),
        (
            "filters[1].any[1].not.language.languages=[klingon]",
            "filters[1].any[1].not.language.languages: 'klingon' is not an ISO 639-1 language code",
        ),
        (
            "filters[2].clip_score={min: 0.2, top_fraction: 0.3}",
            "filters[2].clip_score: give exactly one of min or top_fraction",
        ),
        ("filters[1].any=[]", "filters[1].any: expects a non-empty list of filters"),
        ("model.device=gpu", "model.device: must be one of auto | cpu | cuda | cuda:N"),
        ("model.batch_size=0", "model.batch_size: Input should be greater than 0"),
        # unknown top-level sections
        ("filterz=[]", "filterz: unknown key; did you mean filters?"),
        ("reporting={}", "reporting: unknown key; valid keys: clusters, execution, filters, input, model, output"),
        # the retired in-memory plan: one line naming the key, not a validation dump
        (
            "execution.mode=memory",
            "execution.mode: memory: the in-memory plan was retired in favour of the shard plan, which every run "
            "uses; remove the key",
        ),
        ("execution.mode=fast", "execution.mode: fast: the in-memory plan was retired in favour of the shard plan"),
        # bad --set paths
        ("filters[7].caption.min_words=3", "--set filters[7].caption.min_words: no such key path in the config"),
        ("filters..x=1", "--set 'filters..x': malformed key path"),
    ],
)
def test_each_error_is_one_line(tmp_path, override, message):
    got = check(tmp_path, BASE, "--set", override)
    assert got.startswith(message), got
    if "unknown filter" in message:
        for name in ("caption", "clip_score", "image_size", "language", "text_entities", "uids", "all", "any", "not"):
            assert name in got


@pytest.mark.parametrize("mode", ["auto", "streaming"])
def test_execution_mode_auto_or_streaming_is_dropped_with_a_note(mode):
    """They ran the shard plan already: the config parses, the same as without the key, with one note."""
    from pipelines.config import parse_config

    cfg = parse_config({**BASE, "execution": {"mode": mode}})
    assert cfg.notes == [f"execution.mode: {mode} is ignored: every run uses the shard plan now (remove the key)"]
    assert cfg.sha256() == parse_config(BASE).sha256() and parse_config(BASE).notes == []


def test_same_errors_through_run(tmp_path):
    got = check(tmp_path, BASE, "--set", "filters[2].clip_score.top_fraction=1.5", command="run")
    assert got.startswith("filters[2].clip_score.top_fraction: Input should be less than or equal to 1")
    assert not (tmp_path / "out").exists()


def test_yaml_and_file_errors(tmp_path):
    assert "invalid YAML at line" in check(tmp_path, "input: {shards: [x\n")
    assert "the config must be a YAML mapping" in check(tmp_path, "- just\n- a list\n")
    code, _, err = run_cli("validate", tmp_path / "missing.yaml")
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1


def test_missing_input_paths_fail_validate_and_run(tmp_path):
    assert check(tmp_path, BASE).startswith("input.shards: no shards found")  # validate stats, never reads
    assert check(tmp_path, BASE, command="run").startswith("input.shards: no shards found")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are resolved
    datacomp = {"input": {"datacomp_metadata": str(tmp_path / "no_such_dir")}, "filters": []}
    assert check(tmp_path, datacomp, command="run").startswith("input.datacomp_metadata: ")


def test_filter_needing_a_column_the_input_lacks(tmp_path):
    config = {
        "input": {"datacomp_metadata": "path/to/metadata"},
        "filters": [{"image_size": {"min_side": 200, "size_from": "decoded"}}],
    }
    got = check(tmp_path, config)
    assert got.startswith("filters: image_size needs ['height', 'width']")
