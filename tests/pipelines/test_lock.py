"""One run per output directory (issue 7): a second run is refused while another holds
the directory, and a holder killed with SIGKILL leaves no stale lock behind."""

import os
import signal
import subprocess
import sys

import pytest

from pipelines.lock import OutputLockedError, output_lock
from tests.conftest import REPO, run_cli_subprocess, write_config

HOLD = """
import sys, time
from pipelines.lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on ``tmp_path / 'run'`` (what ``poolsift run`` takes first)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.slow
def test_second_run_on_a_held_directory_is_refused(tmp_path, holder):
    out, proc = holder
    cfg = write_config(tmp_path / "sample.yaml", output={"dir": str(out)})
    second = run_cli_subprocess("run", cfg, "--quiet", timeout=120)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        f"poolsift: error: output directory {out} is in use by another poolsift run (pid {proc.pid}); "
        "wait for it to finish or choose another --output"
    )
    assert "Traceback" not in second.stderr
    assert sorted(os.listdir(out)) == [".poolsift.lock"], "the refused run wrote nothing"


def test_lock_is_released_when_the_holder_is_killed(holder):
    out, proc = holder
    with pytest.raises(OutputLockedError, match="in use by another poolsift run"), output_lock(str(out)):
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with output_lock(str(out)):  # the kernel dropped the dead holder's flock
        assert (out / ".poolsift.lock").read_text() == str(os.getpid())
