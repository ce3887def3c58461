"""The run lock never writes through a planted link (issue 14, finding 11)."""

from __future__ import annotations

import os

import pytest

from pipelines.lock import OutputLockedError, output_lock
from tests.conftest import run_cli


def test_a_symlinked_lock_leaves_its_target_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious contents\n")
    (out / ".poolsift.lock").symlink_to(victim)
    with pytest.raises(OutputLockedError, match="is a symbolic link; refusing"), output_lock(str(out)):
        pass
    assert victim.read_text() == "precious contents\n"


def test_a_dangling_symlink_creates_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "created-by-the-lock"
    (out / ".poolsift.lock").symlink_to(target)
    with pytest.raises(OutputLockedError), output_lock(str(out)):
        pass
    assert not target.exists()


def test_a_hard_linked_lock_leaves_its_other_name_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious contents\n")
    os.link(victim, out / ".poolsift.lock")
    with pytest.raises(OutputLockedError, match="not a plain file of its own"), output_lock(str(out)):
        pass
    assert victim.read_text() == "precious contents\n"


@pytest.mark.slow
def test_run_refuses_a_planted_lock_in_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious contents\n")
    (out / ".poolsift.lock").symlink_to(victim)
    cfg = tmp_path / "c.yaml"
    from tests.conftest import write_config

    write_config(cfg, output={"dir": str(out)})
    code, _, err = run_cli("run", cfg, "--quiet")
    assert code == 1
    assert err.strip().splitlines() == [
        f"poolsift: error: {out}/.poolsift.lock: is a symbolic link; refusing to use it as the run lock (remove it)"
    ]
    assert victim.read_text() == "precious contents\n"
