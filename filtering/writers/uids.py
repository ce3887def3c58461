"""``subset.npy``: the kept uids in DataComp's format — sorted, numpy dtype ``u8,u8`` —
which DataComp's resharder consumes directly."""

from __future__ import annotations

import numpy as np

from filtering.io.atomic import atomic_open
from filtering.uid import uids_to_u8u8


def write_uids(path: str, uids) -> np.ndarray:
    arr = sort_u8u8(uids_to_u8u8(uids))
    with atomic_open(path) as f:
        np.save(f, arr)
    return arr


def sort_u8u8(arr: np.ndarray) -> np.ndarray:
    """``np.sort`` order of a ``u8,u8`` array (by high half, then low half).

    numpy's generic record compare is slow, and ``np.lexsort`` on the two halves takes
    twice as long as one sort: uids are random, so high halves almost never tie. Sort
    by the high half and only fall back to the two-key sort when some do.
    """
    order = np.argsort(arr["f0"], kind="stable")
    out = arr[order]
    if len(out) > 1 and (out["f0"][1:] == out["f0"][:-1]).any():
        out = arr[np.lexsort((arr["f1"], arr["f0"]))]
    return out
