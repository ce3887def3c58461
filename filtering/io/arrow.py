"""Arrow helpers."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading


def preload_pandas() -> None:
    """Start importing pandas on a background thread, if it is installed.

    pyarrow imports pandas (when present) the first time it converts an array, checking
    for pandas objects, which costs about half a second. Started just before Parquet
    decoding, which releases the GIL, the import runs on the other core instead of
    stalling the first conversion afterwards. The module lock makes the later import
    wait for this one rather than run twice. This cannot deadlock on pyarrow's own
    import lock: pandas' import never calls back into pyarrow's pandas check (if it
    did, pyarrow would deadlock on its non-reentrant lock in a single thread).
    """
    if "pandas" in sys.modules or importlib.util.find_spec("pandas") is None:
        return

    def load() -> None:
        # A broken pandas fails again, visibly, where pyarrow imports it.
        with contextlib.suppress(Exception):  # noqa: BLE001
            import pandas  # noqa: F401

    threading.Thread(target=load, name="preload-pandas", daemon=True).start()
