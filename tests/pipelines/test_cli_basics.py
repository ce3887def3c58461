"""The CLI contract: exit 2 with one line for bad config or missing inputs, no traceback."""

import pytest

from tests.conftest import run_cli_subprocess

pytestmark = pytest.mark.slow  # runs the CLI (make test-fast leaves these out)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("input: {shards: '/nonexistent/{00000..00003}.tar'}\nfilters: []\n", "input.shards: no shards found"),
        ("input: {shards: x.tar}\nmodle: {}\n", "modle: unknown key; did you mean model?"),
        (
            "input: {shards: x.tar}\nfilters:\n  - clip_scor: {min: 0.2}\n",
            "unknown filter 'clip_scor'; did you mean clip_score?",
        ),
        ("input: {shards: x.tar}\nmodel: {batch_size: -3}\n", "model.batch_size: Input should be greater than 0"),
        ("input: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    proc = run_cli_subprocess("run", path, "--output", tmp_path / "out", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_config_file(tmp_path):
    proc = run_cli_subprocess("validate", tmp_path / "nope.yaml", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"poolsift: error: config file '{tmp_path / 'nope.yaml'}' not found"
