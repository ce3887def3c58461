"""Sample uids: 32 hex digits, and DataComp's ``u8,u8`` uid arrays (SPEC, "uid").

DataComp stores a uid as the 128-bit integer of its hex string split into two
unsigned 64-bit halves (high, low); ``subset.npy`` files sorted that way are what its
resharder consumes.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_UID_RE = re.compile(r"^[0-9a-f]{32}$")
UID_DTYPE = np.dtype("u8,u8")


def is_uid(value: object) -> bool:
    return isinstance(value, str) and bool(_UID_RE.match(value))


def derive_uid(shard_name: str, key: str) -> str:
    """A stable 128-bit uid for a sample without one: the first 16 bytes of
    sha256(``shard_name`` NUL ``key``), as hex."""
    return hashlib.sha256(f"{shard_name}\x00{key}".encode()).hexdigest()[:32]


def sample_uid(meta: dict | None, shard_name: str, key: str) -> str:
    """The sample's own ``uid`` from its ``.json`` when it is 32 hex digits, else a derived one."""
    if meta:
        uid = meta.get("uid")
        if isinstance(uid, str) and is_uid(uid.lower()):
            return uid.lower()
    return derive_uid(shard_name, key)


def uids_to_u8u8(uids) -> np.ndarray:
    """Convert hex uids to DataComp's structured ``u8,u8`` array (not sorted)."""
    uids = list(uids)
    out = np.empty(len(uids), dtype=UID_DTYPE)
    if uids:
        hi = np.fromiter((int(u[:16], 16) for u in uids), dtype=np.uint64, count=len(uids))
        lo = np.fromiter((int(u[16:], 16) for u in uids), dtype=np.uint64, count=len(uids))
        out["f0"], out["f1"] = hi, lo
    return out


def u8u8_to_uids(arr: np.ndarray) -> list[str]:
    return [f"{int(h):016x}{int(lo):016x}" for h, lo in zip(arr["f0"], arr["f1"], strict=True)]
