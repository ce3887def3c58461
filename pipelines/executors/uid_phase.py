"""Uids: a uid subset.npy cannot hold stops the run in one line, and uids
that two or more readable samples share are reported by ``input.uid.duplicates``
(docs/spec.md, "Semantics that must match DataComp exactly"; issue 14, finding 12):
a count and examples in the manifest (``uids.duplicates``) and one warning line;
``error`` stops the run, ``keep_first`` drops the later copies (pool order) first in the
funnel (``uid_duplicates``, reason ``duplicate_uid``), ``report`` keeps every copy.

The shard plan (``streaming.py``) spills each shard's uids grouped by range of their high
bits (:func:`spill_uids`) and checks one range at a time (:func:`check_range`): a repeat
and all its copies fall in one range, sorted there, so its first copy is found there
too. :func:`filtering.uid.repeated_uids` finds them and :func:`report` says so.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filtering.errors import PoolsiftError
from filtering.filters.base import Decision
from filtering.filters.compose import FilterNode
from filtering.uid import UID_DTYPE, duplicate_examples, high_halves_tie, order_u8u8, repeated_uids, uids_to_u8u8

FINE_BITS = 12  # uid ranges: the top bits of the uid's high half


class UidDuplicates(FilterNode):
    """``input.uid.duplicates: keep_first``: later copies of a uid are dropped, first in the funnel."""

    def __init__(self, later: np.ndarray):
        self.later = later

    def evaluate(self, pool, alive: np.ndarray) -> Decision:
        return Decision(keep=~self.later, reason="duplicate_uid")

    def label(self) -> str:
        return "uid_duplicates"

    def leaves(self) -> list:
        return []


def uid_pairs(table: pa.Table, rows: np.ndarray) -> np.ndarray:
    """The uids of ``rows`` as DataComp's ``u8,u8``; a uid that is not 32 hex digits
    stops the run in one line naming its sample (subset.npy cannot hold it)."""
    uids = table.column("uid").cast(pa.string()).take(pa.array(rows, pa.int64()))
    try:
        return uids_to_u8u8(uids)
    except ValueError as e:
        ok = pc.fill_null(pc.match_substring_regex(uids, "^[0-9a-fA-F]{32}$"), False).to_numpy(zero_copy_only=False)
        row = int(rows[int(np.argmin(ok))])
        where = table.select(["uid", "source_shard", "key"]).slice(row, 1).to_pylist()[0]
        raise PoolsiftError(
            f"uid {where['uid']!r} of sample {where['key']} in {where['source_shard']} is not 32 hex digits: "
            "subset.npy holds each uid as DataComp's 128-bit number"
        ) from e


def report(ctx, policy: str, found: list[dict], names) -> dict[str, Any]:
    """The manifest's record of what :func:`filtering.uid.repeated_uids` found
    (``found``: one result per disjoint set of uids, none empty), and the warning line;
    ``names(keys)`` gives the ``{"source_shard", "key"}`` of the samples at those pool
    keys. Stops the run under ``error``."""
    n_rows = sum(f["rows"] for f in found)
    n_uids = sum(f["uids"] for f in found)
    record: dict[str, Any] = {"policy": policy, "rows": n_rows, "uids": n_uids}
    if n_rows:
        examples = duplicate_examples(found)
        where = names(sorted({k for _, _, keys in examples for k in keys}))
        record["examples"] = [
            {"uid": uid, "count": count, "samples": [where[k] for k in keys]} for uid, count, keys in examples
        ]
        first = examples[0][0]
        action = {
            "report": "all copies kept",
            "keep_first": "later copies dropped (duplicate_uid)",
            "error": "stopping",
        }[policy]
        ctx.log(
            f"warning: {n_uids} uid(s) occur on more than one sample ({n_rows} extra copies, e.g. {first}); "
            f"{action} (input.uid.duplicates)"
        )
    if n_rows and policy == "error":
        raise PoolsiftError(
            f"input.uid.duplicates: {n_uids} uid(s) occur on more than one sample ({n_rows} extra copies, "
            f"e.g. {first}); set input.uid.duplicates: keep_first or report"
        )
    return record


# ---------------------------------------------------------------- the shard plan


def spill_paths(spill: str, i: int) -> dict[str, str]:
    """Shard ``i``'s uid spill files: its alive rows' uids and rows grouped by range
    (``uids``, ``rows``), where each fine range starts in them (``starts``: 4,097 uint32),
    their keep flags (``kept``), the kept count per fine range (``kept_bins``: 4,096
    uint32) and the later-copy flags (``later``). The driver holds no per-shard array:
    it sums ``starts`` and ``kept_bins`` as the shards come (:func:`bin_counts`), and each
    range task finds its rows in every shard's ``starts`` (:func:`rows_in`)."""
    return {
        k: os.path.join(spill, f"{k}-{i:06d}.npy") for k in ("uids", "rows", "starts", "kept", "kept_bins", "later")
    }


def spill_uids(spill: str, i: int, table: pa.Table, alive: np.ndarray, later: bool = False) -> None:
    """Shard ``i``'s alive uids (and their rows, uint32) grouped by the top FINE_BITS bits
    of their high half (a stable radix sort: each group in row order), spilled with where
    each group starts; with ``later``, its later-copy flags (none yet)."""
    rows = np.flatnonzero(alive)
    uids = uid_pairs(table, rows)
    bins = (uids["f0"] >> np.uint64(64 - FINE_BITS)).astype(np.uint16)
    order = np.argsort(bins, kind="stable")
    paths = spill_paths(spill, i)
    np.save(paths["uids"], uids[order])
    np.save(paths["rows"], rows[order].astype(np.uint32))
    starts = np.zeros((1 << FINE_BITS) + 1, np.uint32)
    np.cumsum(np.bincount(bins, minlength=1 << FINE_BITS), out=starts[1:])
    np.save(paths["starts"], starts)
    if later:
        np.save(paths["later"], np.zeros(len(rows), bool))


def spill_kept(spill: str, i: int, keep: np.ndarray) -> None:
    """Shard ``i``'s keep flags, one per spilled uid (in their order), and the kept count per fine range."""
    paths = spill_paths(spill, i)
    np.save(paths["kept"], keep)
    kept_before = np.zeros(len(keep) + 1, np.int64)
    np.cumsum(keep, out=kept_before[1:])
    np.save(paths["kept_bins"], np.diff(kept_before[np.load(paths["starts"])]).astype(np.uint32))


def bin_counts(spill: str, i: int, name: str = "starts") -> np.ndarray:
    """Shard ``i``'s count per fine range (int64, 4,096): its alive rows (``starts``) or its kept ones (``kept_bins``)."""
    counts = np.load(spill_paths(spill, i)[name]).astype(np.int64)
    return np.diff(counts) if name == "starts" else counts


def rows_in(spill: str, i: int, start: int, stop: int) -> tuple[int, int]:
    """Shard ``i``'s row range (of its spilled rows, grouped by range) for the fine ranges ``start:stop``."""
    starts = np.load(spill_paths(spill, i)["starts"], mmap_mode="r")
    return int(starts[start]), int(starts[stop])


def later_rows(spill: str, i: int) -> np.ndarray:
    """Shard ``i``'s rows that are later copies (``keep_first``), as the uid check marked them."""
    paths = spill_paths(spill, i)
    return np.load(paths["rows"])[np.load(paths["later"])].astype(np.int64)


def _load(paths: list[str], ranges: list[tuple[int, int]], dtype) -> np.ndarray:
    chunks = [np.load(path, mmap_mode="r")[lo:hi] for path, (lo, hi) in zip(paths, ranges, strict=True) if hi > lo]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype)


def check_range(args) -> dict | None:
    """One range of uid high bits (the fine ranges ``start:stop``) over every shard: the repeats in it
    (:func:`filtering.uid.repeated_uids`, pool keys ``shard << 32 | row``) unless
    ``check`` is off; under ``mark``, each later copy flagged in its shard's ``later``
    file; with ``target``, the range's kept uids, sorted, written into ``subset.npy`` at
    ``offset``."""
    spill, n_shards, (start, stop), check, mark, target, offset = args
    paths = [spill_paths(spill, i) for i in range(n_shards)]
    ranges = [rows_in(spill, i, start, stop) for i in range(n_shards)]
    uids = _load([p["uids"] for p in paths], ranges, UID_DTYPE)
    found = None
    if check and high_halves_tie(uids):  # else no repeat: the rows are not read
        rows = _load([p["rows"] for p in paths], ranges, np.uint32).astype(np.int64)
        shard = np.repeat(np.arange(n_shards, dtype=np.int64), [hi - lo for lo, hi in ranges])
        found = repeated_uids(uids, shard << 32 | rows)
        if found is not None and mark:
            cuts = np.cumsum([0] + [hi - lo for lo, hi in ranges])
            later = np.sort(found["later"])
            at = np.searchsorted(later, cuts)
            for i in range(n_shards):
                if at[i + 1] > at[i]:
                    flags = np.load(paths[i]["later"], mmap_mode="r+")
                    flags[later[at[i] : at[i + 1]] - cuts[i] + ranges[i][0]] = True
                    flags.flush()
                    del flags
        if found is not None:
            del found["later"]  # the driver needs the counts and examples only
    if target is not None:
        kept = _load([p["kept"] for p in paths], ranges, np.bool_)
        uids = uids[kept]
        uids = uids[order_u8u8(uids, kind="quicksort")]
        if len(uids):
            out = np.load(target, mmap_mode="r+")
            out[offset : offset + len(uids)] = uids
            out.flush()
            del out
    return found
