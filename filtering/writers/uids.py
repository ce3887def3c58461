"""``subset.npy``: the kept uids in DataComp's format — sorted, numpy dtype ``u8,u8`` —
which DataComp's resharder consumes directly."""

from __future__ import annotations

import numpy as np

from filtering.io.atomic import atomic_open
from filtering.uid import sort_u8u8, uids_to_u8u8


def write_uids(path: str, uids) -> np.ndarray:
    arr = sort_u8u8(uids_to_u8u8(uids))
    with atomic_open(path) as f:
        np.save(f, arr)
    return arr
