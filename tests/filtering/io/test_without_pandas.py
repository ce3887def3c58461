"""A run keeps pandas out of its processes (filtering/io/arrow.py, ``without_pandas``):
pyarrow's conversions work without it, and pandas imports again once the run is over."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_conversions_work_without_loading_pandas(tmp_path):
    pytest.importorskip("pandas")  # without pandas installed there is nothing to keep out
    out = _python(f"""
        import sys
        import numpy as np, pyarrow as pa, pyarrow.parquet as pq
        from filtering.io.arrow import without_pandas
        with without_pandas():
            t = pa.table({{"uid": ["a", "b", "c"], "s": np.array([0.5, np.nan, 0.25])}})
            pq.write_table(t, "{tmp_path}/t.parquet")
            r = pq.ParquetFile("{tmp_path}/t.parquet").read()
            kept = r.filter(pa.array(r.column("s").to_numpy() > 0.3))
            values = (r.column("s").to_numpy().tolist(), kept.column("uid").to_pylist(),
                      r.column("uid").to_numpy(zero_copy_only=False).tolist())
            during = "pandas" in sys.modules
        import pandas
        print(during, values, len(r.to_pandas()))
    """)
    assert out == "False ([0.5, nan, 0.25], ['a'], ['a', 'b', 'c']) 3"


def test_loaded_pandas_is_left_alone():
    pytest.importorskip("pandas")
    out = _python("""
        import sys, pandas
        import pyarrow as pa
        from filtering.io.arrow import pandas_blocked, without_pandas
        with without_pandas():
            blocked = pandas_blocked()
            df = pa.table({"a": [1, 2]}).to_pandas()
        print(blocked, len(df))
    """)
    assert out == "False 2"


def test_spawned_task_pool_workers_block_pandas_too(tmp_path):
    pytest.importorskip("pandas")
    script = tmp_path / "spawned.py"  # a file: spawned workers import the task from it
    script.write_text(
        textwrap.dedent("""
        import sys
        import filtering.tasks as tasks
        from filtering.io.arrow import without_pandas

        def loaded(_):
            import numpy as np, pyarrow as pa
            pa.array(np.zeros(3)).to_numpy()
            return "pandas" in sys.modules

        if __name__ == "__main__":
            tasks.start_method = lambda: "spawn"
            with without_pandas(), tasks.task_pool(None, 1) as pool:
                print(list(pool.map(loaded, [0])))
        """)
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[False]"


def test_a_lookup_finds_pandas_and_only_the_import_fails():
    """torch (``torch._dynamo.trace_rules``) and others look packages up with
    ``importlib.util.find_spec``: a lookup must not raise, only the import may."""
    pytest.importorskip("pandas")
    out = _python("""
        import importlib.util
        from filtering.io.arrow import without_pandas
        with without_pandas():
            spec = importlib.util.find_spec("pandas")
            try:
                import pandas
                outcome = "imported"
            except ImportError:
                outcome = "ImportError"
        print(spec is not None, spec.origin, outcome)
    """)
    assert out == "True None ImportError"
