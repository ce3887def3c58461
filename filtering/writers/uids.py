"""``subset.npy``: the kept uids in DataComp's format — sorted, numpy dtype ``u8,u8`` —
which DataComp's resharder consumes directly."""

from __future__ import annotations

import numpy as np

from filtering.io.atomic import atomic_open
from filtering.uid import uids_to_u8u8


def write_uids(path: str, uids) -> np.ndarray:
    arr = uids_to_u8u8(uids)
    # Same order as arr.sort() on the structured dtype (by high, then low half), but
    # np.lexsort on the two uint64 columns avoids numpy's slow generic record compare.
    arr = arr[np.lexsort((arr["f1"], arr["f0"]))]
    with atomic_open(path) as f:
        np.save(f, arr)
    return arr
