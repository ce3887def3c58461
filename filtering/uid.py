"""Sample uids: 32 hex digits, and DataComp's ``u8,u8`` uid arrays (docs/spec.md, "Semantics that must match DataComp exactly": uid).

DataComp stores a uid as the 128-bit integer of its hex string split into two
unsigned 64-bit halves (high, low); ``subset.npy`` files sorted that way are what its
resharder consumes. Everything that parses, derives, packs, sorts, reads or matches uids
is here; the ``uids`` filter (``filtering/filters/uids.py``) and the plan's uid phase
(``pipelines/executors/uid_phase.py``, which writes ``subset.npy``) only use it.
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


def _pair_values() -> np.ndarray:
    """Two ASCII hex digits, read as one little-endian uint16, -> the byte they spell
    (0xFFFF when either is not a hex digit)."""
    digit = np.full(256, -1, dtype=np.int32)
    for i, c in enumerate(b"0123456789abcdef"):
        digit[c] = i
    for i, c in enumerate(b"ABCDEF"):
        digit[c] = 10 + i
    first, second = np.meshgrid(digit, digit, indexing="ij")  # [first char, second char]
    values = np.where((first >= 0) & (second >= 0), (first << 4) | second, 0xFFFF).astype(np.uint16)
    return values.T.reshape(-1)  # index: first | second << 8


_PAIR_VALUE = _pair_values()


def uids_to_u8u8(uids) -> np.ndarray:
    """Convert 32-hex-digit uids to DataComp's structured ``u8,u8`` array (not sorted).

    Equal to DataComp's ``(int(uid[:16], 16), int(uid[16:32], 16))`` per uid, computed
    on the fixed-width bytes with numpy instead of one Python ``int()`` per row: each
    pair of digits is one lookup in a 65,536-entry table (a third of the time of a
    lookup per digit and a shift-or).
    Accepts a list of str, a numpy array, or a pyarrow string array.
    """
    digits = _hex_matrix(uids)
    out = np.empty(len(digits), dtype=UID_DTYPE)
    if len(digits):
        values = _PAIR_VALUE[np.ascontiguousarray(digits).view("<u2")]  # (N, 16) bytes, big-endian halves
        if values.max() > 0xFF:
            bad = int(np.flatnonzero((values > 0xFF).any(axis=1))[0])
            raise ValueError(f"uid {digits[bad].tobytes().decode(errors='replace')!r} is not 32 hex digits")
        halves = values.astype(np.uint8).view(">u8")
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


_HEX_PAIRS = np.frombuffer("".join(f"{i:02x}" for i in range(256)).encode(), dtype=np.uint8).reshape(256, 2)


def u8u8_to_hex(arr: np.ndarray):
    """The uids of a ``u8,u8`` array as 32-hex-digit strings (a pyarrow string array),
    vectorised: each byte's two digits are one table lookup."""
    import pyarrow as pa

    n = len(arr)
    halves = np.empty((n, 2), dtype=">u8")
    halves[:, 0], halves[:, 1] = arr["f0"], arr["f1"]
    digits = _HEX_PAIRS[halves.view(np.uint8).reshape(n, 16)].reshape(-1)
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(digits)])


def sort_u8u8(arr: np.ndarray) -> np.ndarray:
    """``np.sort`` order of a ``u8,u8`` array (by high half, then low half)."""
    return arr[order_u8u8(arr)]


def order_u8u8(arr: np.ndarray, kind: str = "stable") -> np.ndarray:
    """The permutation that sorts a ``u8,u8`` array as ``np.sort`` does (ties in any order).

    numpy's generic record compare is slow, and ``np.lexsort`` on the two halves takes
    twice as long as one sort: uids are random, so high halves almost never tie. Sort
    by the high half and only fall back to the two-key sort when some do. ``stable``
    (timsort) merges an array made of sorted runs in a fraction of quicksort's time.
    """
    order = np.argsort(arr["f0"], kind=kind)
    high = arr["f0"][order]
    if len(high) > 1 and (high[1:] == high[:-1]).any():
        order = np.lexsort((arr["f1"], arr["f0"]))
    return order


def load_uid_list(path: str, key: str = "uids.path") -> np.ndarray:
    """A ``u8,u8`` uid array from a DataComp-format ``.npy`` at ``path`` (local or fsspec
    URL); ``key`` (the config key that named it) starts the error messages."""
    from filtering.errors import InputError
    from filtering.io.paths import open_file

    try:
        with open_file(path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except FileNotFoundError as e:
        raise InputError(f"{key}: no file at {path!r}") from e
    except ValueError as e:
        raise InputError(f"{key}: {path!r} is not a numpy .npy file ({e})") from e
    names = arr.dtype.names or ()
    if len(names) != 2 or any(arr.dtype[n] != np.uint64 for n in names):
        raise InputError(f"{key}: {path!r} has dtype {arr.dtype}; expected DataComp's u8,u8 uid array")
    return arr.astype(UID_DTYPE).reshape(-1)


# --- where a pool's uids come from (docs/spec.md, "Semantics that must match DataComp exactly"; issue 17) --------------------------------

DASHED_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
MAX_EXAMPLES = 10


def derive_uid_from_url(url: str) -> str:
    """A stable 128-bit uid from a sample's url: the first 16 bytes of sha256(url), as hex."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def normalize_uids(raw):
    """DataComp's form of each uid, vectorised: hex lower-cased, a dashed UUID
    (8-4-4-4-12) becomes its 32 hex digits; anything else (missing, other lengths,
    non-hex) becomes null. Nothing is truncated or padded, so no two distinct valid
    uids can collide."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(raw, pa.ChunkedArray):
        raw = raw.combine_chunks() if raw.num_chunks else pa.array([], pa.string())
    low = pc.utf8_lower(raw.cast(pa.string()))
    dashed = pc.fill_null(pc.match_substring_regex(low, DASHED_UUID), False)
    low = pc.if_else(dashed, pc.replace_substring(low, "-", ""), low)
    ok = pc.fill_null(pc.match_substring_regex(low, "^[0-9a-f]{32}$"), False)
    return pc.if_else(ok, low, pa.scalar(None, pa.string()))


class UidError(Exception):
    """Samples without a usable uid under ``on_invalid: error`` (the caller words it for the CLI)."""


def resolve_uids(table, *, source: str, field: str, derive: str, on_invalid: str, failed):
    """The pool's uid column from the cached raw values (``uid``: the ``.json`` field as read).

    ``source``: ``json`` (the field, normalised) or ``derive`` (every uid from ``derive``:
    ``key`` = shard name + sample key, ``url`` = the url). A non-failed row whose json uid
    is missing or malformed is, by ``on_invalid``: ``error`` -> :class:`UidError`;
    ``derive`` -> derived and counted; ``fail`` -> the row fails with ``bad_uid``. Rows
    that failed already (unreadable, failed upstream) get a uid derived from shard and key
    when theirs is unusable; they never reach ``subset.npy``. Returns
    ``(uid, error, report)``: the uid column, the error column (``bad_uid`` added), and
    the counts for the manifest.
    """
    import pyarrow as pa

    n = table.num_rows
    raw = table.column("uid")
    failed = np.asarray(failed, dtype=bool)
    if source == "derive":
        uid = pa.nulls(n, pa.string())
        bad = np.zeros(n, dtype=bool)
    else:
        uid = normalize_uids(raw)
        bad = ~uid.is_valid().to_numpy(zero_copy_only=False)
    need = np.flatnonzero(~uid.is_valid().to_numpy(zero_copy_only=False))
    report = {"source": f"json:{field}" if source == "json" else f"derived:{derive}", "derived": 0, "derived_failed": 0}
    bad_live = bad & ~failed
    if source == "json":
        report["invalid"] = int(bad_live.sum())
        report["on_invalid"] = on_invalid
        if bad_live.any():
            report["examples"] = _uid_examples(table, np.flatnonzero(bad_live)[:MAX_EXAMPLES], field)
        if bad_live.any() and on_invalid == "error":
            raise invalid_uids_error(int(bad_live.sum()), report["examples"][0], field)
    if not len(need):
        return uid.cast(pa.string()), table.column("error"), report
    keys = table.column("key").take(pa.array(need)).to_pylist()
    shards = table.column("source_shard").take(pa.array(need)).to_pylist()
    urls = table.column("url").take(pa.array(need)).to_pylist() if "url" in table.column_names else [None] * len(need)
    by_url = derive == "url" and not (source == "json" and on_invalid == "fail")
    values, no_url = [], []
    for i, key, shard, url in zip(need, keys, shards, urls, strict=True):
        if failed[i] or not by_url:
            values.append(derive_uid(_name(shard), key))
        elif isinstance(url, str) and url:
            values.append(derive_uid_from_url(url))
        else:
            no_url.append((shard, key))
            values.append(derive_uid(_name(shard), key))
    if no_url:
        raise UidError(
            f"{len(no_url)} sample(s) have no url to derive a uid from (first: {no_url[0][0]} key {no_url[0][1]})"
        )
    full = np.empty(n, dtype=object)
    full[:] = uid.to_numpy(zero_copy_only=False)
    full[need] = values
    error = table.column("error")
    fail_now = bad_live if (source == "json" and on_invalid == "fail") else np.zeros(n, dtype=bool)
    if fail_now.any():
        errors = error.to_numpy(zero_copy_only=False).copy()
        errors[fail_now] = [f"bad_uid: .json field {field!r} missing or not 32 hex digits"] * int(fail_now.sum())
        error = pa.array(errors, pa.string())
    report["derived_failed"] = int((failed | fail_now)[need].sum())
    report["derived"] = len(need) - report["derived_failed"]
    return pa.array(full, pa.string()), error, report


def invalid_uids_error(count: int, first: dict, field: str) -> UidError:
    """``on_invalid: error``'s error: ``count`` samples without a valid uid, ``first`` the
    first of them (an example of :func:`first_invalid_uid`)."""
    return UidError(
        f"{count} sample(s) have no valid uid in .json field {field!r} "
        f"(first: {first['source_shard']} key {first['key']}: {first['problem']})"
    )


def count_invalid_uids(table, field: str) -> tuple[int, dict | None]:
    """How many rows of ``table`` (``uid``: the ``.json`` field as read, ``error``, ``key``,
    ``source_shard``) that have not failed have no valid uid, and the first of them as
    :func:`resolve_uids` reports it (None when none): what ``on_invalid: error`` counts,
    one shard at a time."""
    bad = ~_valid_uids(table.column("uid"))
    bad &= ~table.column("error").is_valid().to_numpy(zero_copy_only=False)
    if not bad.any():
        return 0, None
    return int(bad.sum()), _uid_examples(table, np.flatnonzero(bad)[:1], field)[0]


_HEX = "[0-9a-f]"
_VALID_UID = f"^(?:{_HEX}{{32}}|{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}})$"


def _valid_uids(raw) -> np.ndarray:
    """Whether each raw uid is valid (:func:`normalize_uids` gives it a value), by one
    regex over the lower-cased values instead of building the normalised column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(raw, pa.ChunkedArray):
        raw = raw.combine_chunks() if raw.num_chunks else pa.array([], pa.string())
    ok = pc.match_substring_regex(pc.utf8_lower(raw.cast(pa.string())), _VALID_UID)
    return pc.fill_null(ok, False).to_numpy(zero_copy_only=False)


def _name(url: str) -> str:
    from filtering.io.paths import shard_name

    return shard_name(url)


def _uid_examples(table, rows, field: str) -> list[dict]:
    import pyarrow as pa

    picked = table.select(["source_shard", "key", "uid"]).take(pa.array(rows)).to_pylist()
    return [
        {
            "source_shard": r["source_shard"],
            "key": r["key"],
            "problem": f"missing .json field {field!r}"
            if r["uid"] is None
            else f"{r['uid'][:80]!r} is not 32 hex digits or a UUID",
        }
        for r in picked
    ]


EXAMPLE_ROWS = 100  # the first later copies (pool order) the duplicate report's examples are picked from
EXAMPLES = 5  # example uids in the report
EXAMPLE_COPIES = 5  # copies listed per example uid


def high_halves_tie(pairs: np.ndarray) -> bool:
    """Whether two of the uids share a high half: needed for a repeat, and rare among
    distinct random uids, so one plain uint64 sort rules most sets out."""
    high = np.sort(pairs["f0"])
    return len(high) > 1 and bool((high[1:] == high[:-1]).any())


def repeated_uids(pairs: np.ndarray, pool_key: np.ndarray) -> dict | None:
    """Uids that two or more entries of ``pairs`` (``u8,u8``) share; None when none does.

    ``pool_key`` (int64, one per entry, all distinct) orders the entries as the pool does
    (a row; on the shard plan a shard and a row): of each uid's copies the first in that
    order is the first copy, the others are later copies. Returns ``later`` (positions of
    the later copies), ``uids`` (how many uids repeat), ``candidates`` (the first
    EXAMPLE_ROWS later copies in pool order: their keys and uids) and ``copies`` (for each
    candidate's uid: how many copies, and the pool keys of its first EXAMPLE_COPIES): all
    a report needs, and small, whatever the pool."""
    if not high_halves_tie(pairs):
        return None
    order = np.lexsort((pool_key, pairs["f1"], pairs["f0"]))  # by uid, each uid's copies in pool order
    s = pairs[order]
    same = (s["f0"][1:] == s["f0"][:-1]) & (s["f1"][1:] == s["f1"][:-1])
    if not same.any():
        return None
    later = order[1:][same]
    n_uids = int((same & ~np.concatenate([[False], same[:-1]])).sum())
    group = np.cumsum(np.concatenate([[True], ~same])) - 1  # per sorted position: its uid's group
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    cand = later[np.argsort(pool_key[later], kind="stable")[:EXAMPLE_ROWS]]
    copies = {}
    for g in dict.fromkeys(group[rank[cand]].tolist()):
        lo, hi = np.searchsorted(group, [g, g + 1])
        uid = (int(s["f0"][lo]), int(s["f1"][lo]))
        copies[uid] = (int(hi - lo), pool_key[order[lo : min(hi, lo + EXAMPLE_COPIES)]].tolist())
    return {
        "later": later,
        "rows": len(later),
        "uids": n_uids,
        "candidates": (pool_key[cand], pairs[cand]),
        "copies": copies,
    }


def duplicate_examples(found: list[dict]) -> list[tuple[str, int, list[int]]]:
    """The report's examples from :func:`repeated_uids` results over disjoint sets of uids
    (the shard plan's uid ranges; one result in memory): the distinct uids of the first
    EXAMPLE_ROWS later copies in pool order, the first EXAMPLES of them, each as
    ``(uid, copies, pool keys of its first copies)``."""
    keys = np.concatenate([f["candidates"][0] for f in found])
    pairs = np.concatenate([f["candidates"][1] for f in found])
    first = pairs[np.argsort(keys, kind="stable")[:EXAMPLE_ROWS]]
    copies = {k: v for f in found for k, v in f["copies"].items()}
    uids = list(dict.fromkeys((int(h), int(lo)) for h, lo in zip(first["f0"], first["f1"], strict=True)))
    return [(f"{h:016x}{lo:016x}", *copies[(h, lo)]) for h, lo in uids[:EXAMPLES]]
