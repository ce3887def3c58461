"""A subset list, and which of its entries each pool row matches, by uid, sha256 or url
(issue 25, "Portable subsets").

Copies of a pool differ (failed downloads, re-keyed shards, uids written another way), so
a subset made on one copy is matched to another by a key both share. A list is read once
per process (:func:`load_subset_list`) and its entries grouped by each key's value, as
sorted numeric keys (:func:`key_words`), so a row finds its entries by one binary search per
key, and entries that share a value (two uids of one image) are found together.

Lists: a DataComp ``.npy`` of ``u8,u8`` uids (``subset.npy``); Parquet (a file, a folder
of ``*.parquet``, or a poolsift output folder, whose ``subset/`` is read) or CSV with a
header, whose ``uid``, ``sha256`` and ``url`` columns are read; ``.txt``, one value of
the one match key per line.

Values are compared normalised: uids as 32 lower-case hex digits (upper-case hex and
dashed UUIDs accepted), sha256 as 64 lower-case hex digits, urls trimmed, with scheme and
host lower-cased, the default port (``:80`` for http, ``:443`` for https) and the
fragment dropped, and an empty path written ``/``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filtering.errors import InputError
from filtering.io.paths import get_fs, is_local, join, local_path, open_file
from filtering.uid import load_uid_list, normalize_uids, u8u8_to_hex, uids_to_u8u8

KEYS = ("uid", "sha256", "url")
FORMATS = ".npy, .parquet, .csv, .txt, a folder of .parquet files, or a poolsift output folder"
_URL = r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<host>[^/?#]*)(?P<rest>[^#]*)"


def normalize_urls(values) -> pa.Array:
    """Each url in the form compared (module docstring); empty or missing: null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    s = pc.utf8_trim_whitespace(values.cast(pa.string()))
    s = pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)
    parts = pc.extract_regex(s, _URL)
    scheme = pc.utf8_lower(pc.struct_field(parts, "scheme"))
    host = pc.utf8_lower(pc.struct_field(parts, "host"))
    for name, port in (("http", ":80"), ("https", ":443")):
        host = pc.if_else(pc.equal(scheme, name), pc.replace_substring_regex(host, f"{port}$", ""), host)
    rest = pc.struct_field(parts, "rest")
    rest = pc.if_else(pc.starts_with(rest, "/"), rest, pc.binary_join_element_wise("/", rest, ""))
    joined = pc.binary_join_element_wise(scheme, "://", host, rest, "")
    no_fragment = pc.replace_substring_regex(s, "#.*$", "")
    return pc.if_else(pc.is_valid(parts), joined, no_fragment)


def normalize_sha256(values) -> pa.Array:
    """Lower-cased and trimmed; empty or missing: null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    s = pc.utf8_lower(pc.utf8_trim_whitespace(values.cast(pa.string())))
    return pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)


def key_words(key: str, values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Each normalised value that has one as a row of uint64 words, and which values have
    one: a uid's 128 bits (2 words), a sha256's 256 bits (when it is 64 hex digits; 4
    words), a url's BLAKE2b-128 digest (2 words). Numbers, so that a list is sorted once
    and each shard's rows are found by binary search (a hash set of the list would be
    rebuilt for every shard)."""
    present = values.is_valid().to_numpy(zero_copy_only=False)
    if key == "sha256":
        present &= pc.fill_null(pc.match_substring_regex(values, "^[0-9a-f]{64}$"), False).to_numpy(
            zero_copy_only=False
        )
    picked = values.filter(pa.array(present))
    if key == "url":
        raw = b"".join(hashlib.blake2b(v.encode(), digest_size=16).digest() for v in picked.to_pylist())
        return np.frombuffer(raw, dtype=">u8").reshape(-1, 2).astype(np.uint64), present
    halves = [picked] if key == "uid" else [pc.utf8_slice_codeunits(picked, a, a + 32) for a in (0, 32)]
    words = []
    for half in halves:
        u = uids_to_u8u8(half)
        words += [u["f0"], u["f1"]]
    return np.stack(words, axis=1), present


@dataclass(frozen=True)
class KeyIndex:
    """One key of a list: the distinct keys of its entries' values (:func:`key_words`),
    sorted; for each entry the index of its key among them (-1: the entry has no value);
    and, where the key is a digest of the value (url), each distinct key's value, so that
    a hit is checked against the value itself."""

    key: str
    keys: np.ndarray  # (distinct, words) uint64
    group: np.ndarray
    values: pa.Array | None

    @classmethod
    def build(cls, key: str, values: pa.Array) -> KeyIndex:
        k, present = key_words(key, values)
        order = np.argsort(k[:, 0])  # random keys: first words almost never tie
        first = k[order, 0]
        if len(first) > 1 and (first[1:] == first[:-1]).any():
            order = np.lexsort(k.T[::-1])
        k = k[order]
        new = np.ones(len(k), dtype=bool)
        new[1:] = (k[1:] != k[:-1]).any(axis=1)
        ids = np.empty(len(k), dtype=np.int64)
        ids[order] = np.cumsum(new) - 1
        group = np.full(len(values), -1, dtype=np.int64)
        group[present] = ids
        firsts = np.flatnonzero(present)[order[new]]
        kept = values.take(pa.array(firsts, pa.int64())) if key == "url" else None
        return cls(key, np.ascontiguousarray(k[new]), group, kept)

    def lookup(self, values: pa.Array) -> np.ndarray:
        """For each value (normalised), the index of its key among the list's, or -1."""
        q, present = key_words(self.key, values)
        found = np.full(len(values), -1, dtype=np.int64)
        if not len(self.keys) or not len(q):
            return found
        first = self.keys[:, 0]
        left = np.searchsorted(first, q[:, 0], "left")
        right = np.searchsorted(first, q[:, 0], "right")
        at = np.minimum(left, len(first) - 1)
        hit = np.where((right - left == 1) & (self.keys[at] == q).all(axis=1), left, -1)
        for i in np.flatnonzero(right - left > 1):  # list keys sharing their first word
            same = np.flatnonzero((self.keys[left[i] : right[i]] == q[i]).all(axis=1))
            hit[i] = left[i] + same[0] if len(same) else -1
        found[present] = hit
        if self.values is not None:  # a digest matched: the values must too
            rows = np.flatnonzero(found >= 0)
            same = pc.equal(values.take(pa.array(rows)), self.values.take(pa.array(found[rows])))
            found[rows[~same.to_numpy(zero_copy_only=False)]] = -1
        return found


@dataclass(frozen=True)
class SubsetList:
    path: str
    n: int
    keys: dict[str, KeyIndex]  # the match keys, in the order asked
    table: pa.Table  # the list's uid / sha256 / url columns as read (uids normalised), for the report

    def group_counts(self, key: str, tally) -> np.ndarray:
        """Per entry, the rows its ``key`` group matched (``tally``: counts per group)."""
        counts = np.zeros(len(self.keys[key].keys) + 1, dtype=np.int64)
        counts[: min(len(tally), len(counts) - 1)] = tally[: len(counts) - 1]
        return counts[self.keys[key].group]  # group -1 reads the last slot: 0


_LOADED: dict[tuple, SubsetList] = {}
MAX_LOADED = 4  # lists held per process: a run's uids filters (each shard applies every one)


def load_subset_list(path: str, match: tuple[str, ...]) -> SubsetList:
    """The list at ``path`` with an index per key of ``match``; read once per process
    (while the file is unchanged), so every shard a worker filters shares it."""
    stamp = None
    if is_local(path) and os.path.exists(local_path(path)):
        st = os.stat(local_path(path))
        stamp = (st.st_size, st.st_mtime_ns)
    cache_key = (path, match, stamp)
    if cache_key not in _LOADED:
        stale = [k for k in _LOADED if k[:2] == cache_key[:2]]  # the file changed
        oldest = list(_LOADED)[: max(0, len(_LOADED) + 1 - MAX_LOADED)]
        for k in stale + oldest:
            _LOADED.pop(k, None)
        _LOADED[cache_key] = _load(path, match)
    return _LOADED[cache_key]


def _load(path: str, match: tuple[str, ...]) -> SubsetList:
    table = _read(path, match)
    missing = [k for k in match if k not in table.column_names]
    if missing:
        has = ", ".join(table.column_names) or "none of uid, sha256, url"
        hint = " (a .npy holds uids only)" if path.endswith(".npy") else ""
        raise InputError(f"uids.match: {missing[0]}, but {path!r} has no {missing[0]} column{hint}; it has: {has}")
    columns = {}
    for name in table.column_names:
        raw = table.column(name).combine_chunks() if table.num_rows else pa.array([], pa.string())
        if name == "uid" and name in match:
            values = normalize_uids(raw)
            _check(path, name, raw, values, "32 hex digits or a UUID")
        elif name == "sha256" and name in match:
            values = normalize_sha256(raw)
            valid = pc.fill_null(pc.match_substring_regex(values, "^[0-9a-f]{64}$"), True)
            _check(path, name, raw, pc.if_else(valid, values, pa.scalar(None, pa.string())), "64 hex digits")
        else:  # shown in the report as the list has it
            values = raw.cast(pa.string())
        columns[name] = values
    keys = {}
    for key in match:
        values = normalize_urls(columns[key]) if key == "url" else columns[key]
        keys[key] = KeyIndex.build(key, values)
    return SubsetList(path, table.num_rows, keys, pa.table(columns))


def _check(path: str, name: str, raw: pa.Array, normalised: pa.Array, expected: str) -> None:
    """A value present in the list but not of its key's form is an error naming it."""
    bad = np.flatnonzero(
        normalize_sha256(raw).is_valid().to_numpy(zero_copy_only=False)
        & ~normalised.is_valid().to_numpy(zero_copy_only=False)
    )
    if len(bad):
        raise InputError(
            f"uids.path: {path!r} entry {int(bad[0])}: {name} {raw[int(bad[0])].as_py()!r} is not {expected}"
            f" ({len(bad)} such entries)"
        )


def _read(path: str, match: tuple[str, ...]) -> pa.Table:
    """The list's uid / sha256 / url columns (those it has), as strings."""
    lower = path.rstrip("/").lower()
    if lower.endswith(".npy"):
        return pa.table({"uid": u8u8_to_hex(load_uid_list(path))})
    if lower.endswith(".txt"):
        if len(match) != 1:
            raise InputError(
                f"uids.path: {path!r} holds one value per line: give uids.match one key, not {list(match)}"
            )
        with open_file(path, "rb") as f:
            lines = [ln.strip() for ln in f.read().decode("utf-8", errors="replace").splitlines()]
        return pa.table({match[0]: pa.array([ln for ln in lines if ln], pa.string())})
    if lower.endswith((".csv", ".tsv")):
        import pyarrow.csv as pcsv

        opts = pcsv.ConvertOptions(column_types=dict.fromkeys(KEYS, pa.string()), include_columns=None)
        parse = pcsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
        try:
            with open_file(path, "rb") as f:
                table = pcsv.read_csv(f, parse_options=parse, convert_options=opts)
        except FileNotFoundError as e:
            raise InputError(f"uids.path: no file at {path!r}") from e
        except pa.ArrowInvalid as e:
            raise InputError(f"uids.path: {path!r} is not a CSV list ({str(e).splitlines()[0]})") from e
        return table.select([k for k in KEYS if k in table.column_names])
    return _read_parquet(path)


def _read_parquet(path: str) -> pa.Table:
    import pyarrow.parquet as pq

    fs, p = get_fs(path)
    if not fs.exists(p):
        raise InputError(f"uids.path: no file at {path!r}")
    if fs.isdir(p):
        if fs.exists(f"{p}/subset") and fs.exists(f"{p}/manifest.json"):  # a poolsift output folder
            return _read_parquet(join(path, "subset"))
        files = sorted(fs.glob(f"{p}/*.parquet"))
        if not files:
            raise InputError(f"uids.path: {path!r} is a folder without .parquet files; a list is {FORMATS}")
    elif p.lower().endswith(".parquet"):
        files = [p]
    else:
        raise InputError(f"uids.path: {path!r} is not a list poolsift reads; a list is {FORMATS}")
    tables = []
    for name in files:
        try:
            with fs.open(name, "rb") as f:
                pf = pq.ParquetFile(f)
                wanted = [k for k in KEYS if k in pf.schema_arrow.names]
                t = pf.read(columns=wanted)
        except pa.ArrowInvalid as e:
            raise InputError(f"uids.path: {name!r} is not a Parquet file ({str(e).splitlines()[0]})") from e
        tables.append(t.cast(pa.schema([(c, pa.string()) for c in t.column_names])))
    if len({tuple(t.column_names) for t in tables}) > 1:
        raise InputError(f"uids.path: the Parquet files under {path!r} have different columns")
    return pa.concat_tables(tables)
