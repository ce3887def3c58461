"""Subset filter: keep (or drop) the rows a subset list names, matched by uid, sha256 or url.

The list is what DataComp's baselines write and its resharder reads (and what poolsift
writes as ``subset.npy``: a numpy array of dtype ``u8,u8``, each uid's 128 bits split
into (high, low) unsigned 64-bit halves), or a Parquet / CSV / text list with ``uid``,
``sha256`` or ``url`` columns (``filtering/filters/subset_list.py``). Use it to
intersect with selections made elsewhere (``mode: keep``) or to remove a blocklist
(``mode: drop``).

``match`` says by which key a row matches an entry: ``uid`` (default), ``sha256`` (of the
image: the pool's ``sha256`` column, and ``image_sha256``, the hash of the stored bytes,
where the source has its own ``sha256``) or ``url``; a list of keys matches by any of
them, and an entry is reported as found by the first key that finds it. So a subset
applied to another copy of the pool (re-keyed shards, uids written another way, samples
missing) is matched by what the copies share, as Recap-DataComp's maintainers suggest
(``sha256``, UCSC-VLAA/Recap-DataComp-1B #11).

The decision is row-local; the match report (entries found, by which key, not found,
matched by more than one row) is a :class:`Tally`: each shard's counts per list entry,
added up over the pool by the plan, then written by :meth:`Uids.report`.

Reason codes: ``uid_not_listed`` (mode keep), ``uid_listed`` (mode drop).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from filtering.errors import InputError
from filtering.filters.base import Decision, Filter, Params, Tally, register
from filtering.filters.subset_list import load_subset_list, normalize_sha256, normalize_urls
from filtering.pool import Pool

MatchKey = Literal["uid", "sha256", "url"]


class UidsParams(Params):
    path_fields: ClassVar[tuple[str, ...]] = ("path",)  # local paths: resolved against the config's folder
    path: str = Field(min_length=1)
    mode: Literal["keep", "drop"] = "keep"
    match: MatchKey | list[MatchKey] = "uid"

    @field_validator("match")
    @classmethod
    def _distinct(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("match: one key or a list of distinct keys (uid, sha256, url)")
        return v

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.match) if isinstance(self.match, list) else (self.match,)


@register
class Uids(Filter):
    name = "uids"
    Params = UidsParams
    report_name = "subset_match"

    def requires(self) -> set[str]:
        return set(self.params.keys)

    def reduction(self) -> Tally:
        return Tally()

    def check(self) -> None:
        self._list()  # read before any data: a list lacking a match key's column fails here

    def _list(self):
        return load_subset_list(self.params.path, self.params.keys)

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        listed = self._list()
        hit = np.zeros(pool.n, dtype=bool)
        tally: dict[str, Any] = {}
        for key in self.params.keys:
            group = np.full(pool.n, -1, dtype=np.int64)
            present = np.zeros(pool.n, dtype=bool)
            for column in _columns(pool, key):
                values = _normalized(key, pool.table.column(column))
                found = listed.keys[key].lookup(values)
                group = np.where(group >= 0, group, found)
                present |= values.is_valid().to_numpy(zero_copy_only=False)
            hit |= group >= 0
            seen = group[alive & (group >= 0)]
            tally[key] = np.unique(seen, return_counts=True)
            tally[f"rows_with_{key}"] = int((alive & present).sum())
        tally["rows"] = int(alive.sum())
        if self.params.mode == "keep":
            return Decision(hit, "uid_not_listed", tally=tally)
        return Decision(~hit, "uid_listed", tally=tally)

    def report(self, sums: dict[str, Any], log) -> tuple[dict[str, Any], dict[str, pa.Table]]:
        """The match report from the pool's sums: a manifest record, and the tables of the
        entries not found (``unmatched``) and of those more than one row matched
        (``multiple``), each with the list's uid / sha256 / url and its row in the list."""
        listed = self._list()
        sums = sums or {}
        for key in self.params.keys:
            if sums.get("rows") and not sums.get(f"rows_with_{key}"):
                raise InputError(f"uids.match: {key}, but no row of the pool has a {key}; match by a key the pool has")
        found_by = np.full(listed.n, "", dtype=object)
        rows = np.zeros(listed.n, dtype=np.int64)
        for key in self.params.keys:
            counts = listed.group_counts(key, sums.get(key, np.zeros(0, dtype=np.int64)))
            first = (found_by == "") & (counts > 0)
            found_by[first], rows[first] = key, counts[first]
        unmatched = np.flatnonzero(found_by == "")
        multiple = np.flatnonzero(rows > 1)
        by_key = {k: int((found_by == k).sum()) for k in self.params.keys}
        record = {
            "list": self.params.path,
            "match": list(self.params.keys),
            "entries": listed.n,
            "found": listed.n - len(unmatched),
            "found_by": by_key,
            "not_found": len(unmatched),
            "matched_more_than_one_row": len(multiple),
        }
        table = listed.table.append_column("entry", pa.array(np.arange(listed.n), pa.int64()))
        table = table.select(["entry", *[c for c in table.column_names if c != "entry"]])
        tables = {
            "unmatched": table.take(pa.array(unmatched, pa.int64())),
            "multiple": table.take(pa.array(multiple, pa.int64()))
            .append_column("found_by", pa.array(found_by[multiple].astype(str), pa.string()))
            .append_column("rows", pa.array(rows[multiple], pa.int64())),
        }
        keys = ", ".join(f"{k} {v:,}" for k, v in by_key.items())
        log(
            f"uids: {record['found']:,} of {listed.n:,} list entries found ({keys}); {len(unmatched):,} not found"
            + (f", {len(multiple):,} matched more than one row" if len(multiple) else "")
        )
        return record, tables


def _columns(pool: Pool, key: str) -> list[str]:
    """The pool columns a key is read from: ``sha256`` and, where the source has its own
    sha256, ``image_sha256`` (the stored bytes') too."""
    if key == "sha256":
        return [c for c in ("sha256", "image_sha256") if c in pool.table.column_names]
    return [key]


def _normalized(key: str, column) -> pa.Array:
    if key == "url":
        return normalize_urls(column)
    if key == "sha256":
        return normalize_sha256(column)
    return column.combine_chunks().cast(pa.string()) if isinstance(column, pa.ChunkedArray) else column
