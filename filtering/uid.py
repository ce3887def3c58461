"""Sample uids: 32 hex digits, and DataComp's ``u8,u8`` uid arrays (docs/spec.md, "Semantics that must match DataComp exactly": uid).

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


_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i


def uids_to_u8u8(uids) -> np.ndarray:
    """Convert 32-hex-digit uids to DataComp's structured ``u8,u8`` array (not sorted).

    Equal to DataComp's ``(int(uid[:16], 16), int(uid[16:32], 16))`` per uid, computed
    on the fixed-width bytes with numpy instead of one Python ``int()`` per row.
    Accepts a list of str, a numpy array, or a pyarrow string array.
    """
    digits = _hex_matrix(uids)
    out = np.empty(len(digits), dtype=UID_DTYPE)
    if len(digits):
        nibbles = _HEX_VALUE[digits]
        if (nibbles == 255).any():
            bad = int(np.flatnonzero((nibbles == 255).any(axis=1))[0])
            raise ValueError(f"uid {digits[bad].tobytes().decode(errors='replace')!r} is not 32 hex digits")
        packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # (N, 16) bytes, big-endian halves
        halves = np.ascontiguousarray(packed).view(">u8")
        out["f0"], out["f1"] = halves[:, 0], halves[:, 1]
    return out


def _hex_matrix(uids) -> np.ndarray:
    """The uids' ASCII bytes as an (N, 32) uint8 matrix; raises if any uid is not 32 characters."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    if not isinstance(uids, pa.Array):
        uids = pa.array(uids if isinstance(uids, np.ndarray | list) else list(uids), pa.string())
    if uids.type == pa.large_string():
        uids = uids.cast(pa.string())
    n = len(uids)
    if n == 0:
        return np.zeros((0, 32), dtype=np.uint8)
    if uids.null_count or pc.min(pc.binary_length(uids)).as_py() != 32 or pc.max(pc.binary_length(uids)).as_py() != 32:
        bad = next(u for u in uids.to_pylist() if u is None or len(u.encode()) != 32)
        raise ValueError(f"uid {bad!r} is not 32 hex digits")
    offsets = np.frombuffer(uids.buffers()[1], dtype=np.int32, count=n + 1, offset=uids.offset * 4)
    data = np.frombuffer(uids.buffers()[2], dtype=np.uint8)
    return data[offsets[0] : offsets[-1]].reshape(n, 32)


def u8u8_to_uids(arr: np.ndarray) -> list[str]:
    return [f"{int(h):016x}{int(lo):016x}" for h, lo in zip(arr["f0"], arr["f1"], strict=True)]
