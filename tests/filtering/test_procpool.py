"""A decode worker killed mid-result must give BrokenProcessPool, not a hang (filtering/procpool.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import concurrent.futures as cf, multiprocessing as mp, os, signal, time
    from concurrent.futures.process import BrokenProcessPool
    from filtering import procpool

    def big(_):
        return b"y" * 5_000_000  # several pipe buffers: the kill lands mid-send

    if __name__ == "__main__":
        for delay in (0.0, 0.001, 0.002, 0.004, 0.008):
            ex = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
            futs = [ex.submit(big, b"x" * 200_000) for _ in range(20)]
            procpool.result(futs[0], ex)
            time.sleep(delay)
            for p in mp.active_children():
                os.kill(p.pid, signal.SIGKILL)
            try:
                for f in futs:
                    procpool.result(f, ex)
                raise SystemExit("every result arrived although the worker was killed")
            except BrokenProcessPool:
                pass
            procpool.shutdown(ex)
            assert not mp.active_children(), mp.active_children()
        print("ok")
    """
)


def test_killed_worker_mid_result_raises_instead_of_hanging(tmp_path):
    script = tmp_path / "kill_mid_result.py"
    script.write_text(SCRIPT)
    # Plain fut.result() + shutdown(wait=True) hang here in most runs on CPython 3.11:
    # the timeout turns such a hang into a failure instead of a stuck suite.
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
        env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_result_passes_values_through():
    import concurrent.futures as cf
    import multiprocessing as mp

    from filtering import procpool

    ex = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
    try:
        assert procpool.result(ex.submit(abs, -3), ex) == 3
        assert not procpool.worker_died(ex)
    finally:
        procpool.shutdown(ex)


MAP_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, os, signal, time
    from concurrent.futures.process import BrokenProcessPool
    from filtering.procpool import ProcessPool

    def big(_):
        return b"y" * 5_000_000

    if __name__ == "__main__":
        for delay in (0.0, 0.001, 0.002, 0.004, 0.008):
            try:
                with ProcessPool(1, mp_context=mp.get_context("spawn")) as pool:
                    results = pool.map(big, range(20))
                    next(results)
                    time.sleep(delay)
                    for p in mp.active_children():
                        os.kill(p.pid, signal.SIGKILL)
                    for _ in results:
                        pass
                raise SystemExit("every result arrived although the worker was killed")
            except BrokenProcessPool:
                pass
            assert not mp.active_children(), mp.active_children()
        with ProcessPool(2, mp_context=mp.get_context("spawn")) as pool:
            assert list(pool.map(abs, [-1, -2, 3])) == [1, 2, 3]
        print("ok")
    """
)


def test_process_pool_map_and_with_block_survive_a_killed_worker(tmp_path):
    """The pools of cluster decoding, language identification and the streaming plan."""
    script = tmp_path / "kill_mid_map.py"
    script.write_text(MAP_SCRIPT)
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
        env={**__import__("os").environ, "PYTHONPATH": root},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
