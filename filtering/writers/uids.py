"""``subset.npy``: the kept uids in DataComp's format — sorted, numpy dtype ``u8,u8`` —
which DataComp's resharder consumes directly."""

from __future__ import annotations

import numpy as np

from filtering.cache import save_npy
from filtering.uid import sort_u8u8, uids_to_u8u8


def write_uids(path: str, uids) -> np.ndarray:
    arr = sort_u8u8(uids_to_u8u8(uids))
    save_npy(path, arr)
    return arr
