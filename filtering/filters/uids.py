"""uid-list filter: keep (or drop) the uids listed in a DataComp-format ``.npy``.

The file is what DataComp's baselines write and its resharder reads (and what
poolsift writes as ``subset.npy``): a numpy array of dtype ``u8,u8``, each uid's 128
bits split into (high, low) unsigned 64-bit halves. Use it to intersect with
selections made elsewhere (``mode: keep``) or to remove a blocklist (``mode: drop``).

Reason codes: ``uid_not_listed`` (mode keep), ``uid_listed`` (mode drop).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from filtering.errors import InputError
from filtering.filters.base import Decision, Filter, Params, register
from filtering.io.paths import open_file
from filtering.pool import Pool
from filtering.uid import UID_DTYPE, uids_to_u8u8


class UidsParams(Params):
    path_fields: ClassVar[tuple[str, ...]] = ("path",)  # local paths: resolved against the config's folder
    path: str = Field(min_length=1)
    mode: Literal["keep", "drop"] = "keep"


def load_uid_list(path: str) -> np.ndarray:
    """A ``u8,u8`` uid array from ``path`` (local or fsspec URL)."""
    try:
        with open_file(path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except FileNotFoundError as e:
        raise InputError(f"uids.path: no file at {path!r}") from e
    except ValueError as e:
        raise InputError(f"uids.path: {path!r} is not a numpy .npy file ({e})") from e
    names = arr.dtype.names or ()
    if len(names) != 2 or any(arr.dtype[n] != np.uint64 for n in names):
        raise InputError(f"uids.path: {path!r} has dtype {arr.dtype}; expected DataComp's u8,u8 uid array")
    return arr.astype(UID_DTYPE).reshape(-1)


def _as_binary(arr: np.ndarray) -> pa.Array:
    """A ``u8,u8`` array as 16-byte binary values, for Arrow's hash-based ``is_in``."""
    raw = np.ascontiguousarray(arr).view(np.uint8)
    return pa.Array.from_buffers(pa.binary(16), len(arr), [None, pa.py_buffer(raw)])


@register
class Uids(Filter):
    name = "uids"
    Params = UidsParams

    def requires(self) -> set[str]:
        return {"uid"}

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        listed = load_uid_list(self.params.path)
        ours = uids_to_u8u8(pool.table.column("uid"))
        hit = pc.is_in(_as_binary(ours), value_set=_as_binary(listed)).to_numpy(zero_copy_only=False)
        if self.params.mode == "keep":
            return Decision(hit, "uid_not_listed")
        return Decision(~hit, "uid_listed")
