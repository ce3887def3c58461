"""Hostile configs (issue 14, finding 6): every bad config or ``--set`` value is exit 2
with one line naming the key, NaN and infinite thresholds are refused, and a YAML alias
bomb is refused before anything walks its expansion."""

from __future__ import annotations

import resource
import sys

import pytest
import yaml

from tests.conftest import REPO, run_cli, run_cli_subprocess

BASE = {
    "input": {"shards": "/nonexistent/pool/{00000..00003}.tar"},
    "model": {"arch": "poolsift-tiny", "pretrained": None},
    "filters": [{"clip_score": {"top_fraction": 0.3}}, {"dedup": {"method": "semantic", "threshold": 0.95}}],
}


def one_line_exit_2(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("poolsift: error: ")
    return lines[0].removeprefix("poolsift: error: ")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.arch=!!python/object/apply:os.system [echo pwned]", "--set model.arch: invalid YAML"),
        ("model.arch=!!python/name:os.system", "--set model.arch: invalid YAML"),
        ("filters[0].clip_score.min=[1, 2", "--set filters[0].clip_score.min: invalid YAML"),
        ("output.dir={a: b: c}", "--set output.dir: invalid YAML"),
    ],
)
def test_bad_set_values_are_exit_2_naming_the_key(config, override, expected):
    msg = one_line_exit_2(*run_cli("validate", config, "--set", override)[::2])
    assert msg.startswith(expected), msg


@pytest.mark.slow
def test_a_python_tag_in_the_file_is_exit_2(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("input: {shards: !!python/object/apply:os.system [echo pwned]}\n")
    msg = one_line_exit_2(*run_cli("validate", path)[::2])
    assert msg.startswith(f"{path}: invalid YAML"), msg


@pytest.mark.slow
def test_a_non_utf8_config_is_exit_2(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(yaml.safe_dump(BASE).encode() + b"# caf\xe9\n")
    msg = one_line_exit_2(*run_cli("validate", path)[::2])
    assert msg.startswith(f"{path}: not UTF-8 text (byte 0xe9 at offset "), msg


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("filters[0].clip_score={min: .nan}", "filters[0].clip_score.min"),
        ("filters[0].clip_score={min: -.inf}", "filters[0].clip_score.min"),
        ("filters[0].clip_score={top_fraction: .nan}", "filters[0].clip_score.top_fraction"),
        ("filters[1].dedup.threshold=.nan", "filters[1].dedup.threshold"),
        ("filters[1]={image_size: {max_aspect_ratio: .inf}}", "filters[1].image_size.max_aspect_ratio"),
        ("clusters={sample_fraction: .nan}", "clusters.sample_fraction"),
    ],
)
def test_nan_and_infinite_thresholds_are_refused(config, override, key):
    msg = one_line_exit_2(*run_cli("validate", config, "--set", override)[::2])
    assert msg.startswith(f"{key}: Input should be a finite number"), msg


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h,*h]
input: {shards: *i}
"""

LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS")
def test_a_yaml_alias_bomb_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 700
    import subprocess

    # 1 GiB of address space (the unguarded walk needed 2.9 GB); the timeout only
    # guards against a hang, it is not a speed assertion.
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED, "validate", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    msg = one_line_exit_2(proc.returncode, proc.stderr)
    assert msg == f"{path}: YAML aliases expand to more than 100,000 values", msg


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("input.shards=&a [x, *a]", "--set input.shards: a YAML alias refers to itself"),
        ("output.dir=" + "[" * 5000 + "]" * 5000, "--set output.dir: invalid YAML: nested too deeply"),
    ],
)
def test_recursive_and_deep_values_are_exit_2(config, override, expected):
    assert one_line_exit_2(*run_cli("validate", config, "--set", override)[::2]) == expected


@pytest.mark.slow
def test_a_long_bad_value_is_shown_truncated(config):
    msg = one_line_exit_2(*run_cli("validate", config, "--set", "model.batch_size=" + "x" * 100_000)[::2])
    assert msg.startswith("model.batch_size: Input should be a valid integer"), msg
    assert len(msg) < 200


@pytest.mark.slow
def test_the_bomb_through_run_is_exit_2_too(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    proc = run_cli_subprocess(
        "run",
        path,
        "--quiet",
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)),
    )
    one_line_exit_2(proc.returncode, proc.stderr)
