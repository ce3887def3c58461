"""How the local task pool starts its workers (filtering/tasks.py, ``start_method``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from filtering.tasks import start_method, task_pool

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)


def _square(x: int) -> int:
    return x * x


def test_a_metadata_only_driver_forks():
    """In a fresh interpreter (the test session runs threads of its own): numpy and
    pyarrow loaded, no torch, no other thread."""
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    code = "import numpy, pyarrow.parquet; from filtering.tasks import start_method; print(start_method())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fork"


def test_a_driver_that_imported_torch_spawns(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert start_method() == "spawn"


def test_a_driver_running_another_thread_spawns(no_torch):
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert start_method() == "spawn"
    finally:
        stop.set()
        thread.join()


def test_a_driver_that_loaded_faiss_spawns(no_torch, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", types.ModuleType("faiss"))
    assert start_method() == "spawn"


def test_workers_search_with_faiss_after_the_driver_did(tmp_path):
    """libgomp (faiss's OpenMP) does not survive a fork: a driver that ran a parallel
    region (the image_clusters targets, a k-means) and then forked workers that search
    with faiss hung for ever, the workers spinning on a team that no longer exists
    (found in test_golden_outputs[image_based]; a fork pool hangs here)."""
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent("""
        import numpy as np
        import faiss
        from filtering.tasks import task_pool

        faiss.omp_set_num_threads(2)
        x = np.random.default_rng(0).random((20000, 16), dtype=np.float32)
        index = faiss.IndexFlatL2(16)
        index.add(x[:500])

        def search(rows):
            return int(index.search(x[:rows], 1)[1].sum())

        if __name__ == "__main__":
            search(len(x))  # a parallel region in the driver
            with task_pool(None, 2) as pool:
                print(sum(pool.map(search, [len(x)] * 2)) == 2 * search(len(x)))
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        out = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the task pool's workers hung in faiss after the driver's own faiss search")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_both_start_methods_run_tasks(monkeypatch, method):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    import filtering.tasks as tasks

    monkeypatch.setattr(tasks, "start_method", lambda: method)
    with task_pool(None, 2) as pool:
        assert list(pool.map(_square, range(5))) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_die_with_a_killed_driver(tmp_path, method):
    """A driver killed mid-run (SIGKILL, the OOM killer) takes its workers with it: a
    forked worker holds the driver's pipes and the output lock, and would otherwise wait
    for tasks for ever, keeping the folder locked against every rerun."""
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    pids = tmp_path / "pids"
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, time
        import filtering.tasks as tasks

        def task(_):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(60)

        if __name__ == "__main__":
            tasks.start_method = lambda: {method!r}
            with tasks.task_pool(None, 2) as pool:
                pool.submit(task, 0), pool.submit(task, 1)
                while not os.path.exists({str(pids)!r}) or len(open({str(pids)!r}).read().split()) < 2:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
        """)
    )
    out = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120
    )
    assert out.returncode == -9
    workers = [int(p) for p in pids.read_text().split()]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)


# Each pool's driver: start the pool, and from a second thread, once both workers exist,
# record their pids and kill the driver while the pool is in use.
_POOL_DRIVERS = {
    "decode": """
        import io
        from PIL import Image
        from filtering.stages.image_decode import decode_window, reference_plan

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
        tasks = ((i, [buf.getvalue()] * 8, ("phash",)) for i in range(10**6))
        for _ in decode_window(tasks, reference_plan(), 2, 4):
            pass
    """,
    "language": """
        from filtering.scorers.language_identifiers import predict_texts

        texts = [f"a photo number {i} of a dog on the beach" for i in range(400_000)]
        predict_texts(texts, "py3langid", workers=2, min_parallel=0)
    """,
}


@pytest.mark.parametrize("pool", sorted(_POOL_DRIVERS))
def test_decode_and_language_workers_die_with_a_killed_driver(tmp_path, pool):
    """Every pool is made by ``tasks.process_pool``, so the decode workers and the
    language-identification workers die with a killed driver too (without the guard, a
    spawned worker holds both ends of its task queue and waits for ever)."""
    pids = tmp_path / "pids"
    script = tmp_path / "driver.py"
    body = textwrap.indent(textwrap.dedent(_POOL_DRIVERS[pool]), "    ")
    script.write_text(
        textwrap.dedent(f"""
        import multiprocessing as mp, os, signal, threading, time

        def killer():
            while len(mp.active_children()) < 2:
                time.sleep(0.05)
            time.sleep(0.5)  # the workers are past their start-up
            with open({str(pids)!r}, "w") as f:
                f.write(" ".join(str(p.pid) for p in mp.active_children()))
            os.kill(os.getpid(), signal.SIGKILL)

        if __name__ == "__main__":
            threading.Thread(target=killer, daemon=True).start()
        """)
        + body
        + "\n    time.sleep(60)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=180
    )
    assert out.returncode == -9
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) >= 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    alive = [p for p in workers if _alive(p)]
    for p in alive:  # leave no stray process behind a failing test
        os.kill(p, 9)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
