"""A reference's perceptual block tables: ``INDEX/blocks-d<k>/``, written once, read by every
``dedup: {method: perceptual, max_distance: k, against: [...]}`` after.

The search against a reference (:mod:`filtering.dedup.against`) pairs each new row with
the reference rows that share one of its ``k + 1`` block values (multi-index hashing:
two 64-bit hashes within distance ``k`` agree exactly on at least one of ``k + 1``
disjoint blocks, :func:`filtering.dedup.partitioned.blocks`; Norouzi et al., CVPR 2012).
Re-making the reference's ``k + 1`` records per row from its index on every run, and
spilling them, cost more than the in-pool search (issue 25's bench, docs/performance.md).
So the reference's side is written once, for one block layout, beside its index:

- ``hash.npy``: the hash of every index row that has one (uint64), in index order: the
  row's *ordinal*; ``uid.npy``: its uid as two uint64.
- ``order-<b>.npy`` per block ``b``: the ordinals sorted by the block's *cell* (its value's
  top :data:`GRID_BITS` bits, or all of them when narrower), int32; ``cells-<b>.npy``:
  where each cell starts in that order (int64, one more than the cells).
- ``meta.json`` (written last): the version, ``max_distance`` and block layout, the rows,
  and the index's fingerprint (``index.json``'s bytes and each index file's size and
  modification time), so that tables made for another layout or a since-rewritten index
  are never read: they are made again, with one line saying so.

24 bytes per row plus 4 per block: 52 bytes a row for ``max_distance: 6``. A search cuts
each block's cells into partitions of about
:data:`~filtering.dedup.against.RECORDS_PER_PARTITION` records (the references' counts
per cell, plus the pool's in proportion) and spills the pool's records by the same cuts;
a partition's reference records are then one contiguous slice of ``order-<b>.npy`` per
reference, their hashes gathered from the memory-mapped ``hash.npy``. The folder is made
under a temporary name and renamed into place, so a reader never sees half of one; two
runs making it at once both succeed (the second keeps the first's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from filtering.dedup import index as ix
from filtering.dedup import partitioned
from filtering.io.paths import is_local, local_path

VERSION = 1
GRID_BITS = 12  # cells per block: at most 4,096 (a partition is a range of cells)
META = "meta.json"


def folder_of(ref: ix.Reference, max_distance: int) -> str:
    """The block tables of ``ref`` for ``max_distance`` (a local path: see :func:`usable`)."""
    return os.path.join(local_path(ref.folder), f"blocks-d{max_distance}")


def usable(ref: ix.Reference, max_distance: int) -> bool:
    """Block tables are memory-mapped: only an index on a local file system has them, and
    only one whose tables are there already or whose folder this process may write in (a
    reference in a read-only place is searched without them)."""
    if not is_local(ref.folder):
        return False
    return state(ref, max_distance) is None or writable(local_path(ref.folder))


def writable(folder: str) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def grid_bits(width: int) -> int:
    return min(width, GRID_BITS)


def fingerprint(ref: ix.Reference) -> str:
    """The index as the tables were made from it: ``index.json``'s bytes, and each index
    file's size and modification time (a rewritten output changes them)."""
    digest = hashlib.sha256()
    folder = local_path(ref.folder)
    with open(os.path.join(folder, ix.META), "rb") as f:
        digest.update(f.read())
    for url, _ in ref.files:
        st = os.stat(local_path(url))
        digest.update(f"{os.path.basename(url)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def expected_meta(ref: ix.Reference, max_distance: int) -> dict:
    return {
        "version": VERSION,
        "max_distance": max_distance,
        "blocks": [list(b) for b in partitioned.blocks(max_distance)],
        "grid_bits": GRID_BITS,
        "index": fingerprint(ref),
    }


def state(ref: ix.Reference, max_distance: int) -> str | None:
    """None when ``ref``'s tables for ``max_distance`` can be read; else why not ("none",
    or what differs)."""
    path = os.path.join(folder_of(ref, max_distance), META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "none"
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    want = expected_meta(ref, max_distance)
    for key, value in want.items():
        if meta.get(key) != value:
            return "from an earlier index" if key == "index" else f"of another {key}"
    return None


def _index_columns(ref: ix.Reference, columns: Sequence[str]):
    """Per index file, its rows with a hash: ``columns`` as numpy arrays (one file's batches
    mapped at a time, so a large index is never mapped whole)."""
    for piece in ref.all_pieces():
        batches = partitioned.read_batches([piece])
        out = {c: [] for c in columns}
        for batch in batches:
            ph = batch.column("phash")
            valid = ph.is_valid().to_numpy(zero_copy_only=False)
            if valid.any():
                for c in columns:
                    col = ph.fill_null(0) if c == "phash" else batch.column(c)
                    out[c].append(np.asarray(col.to_numpy(), np.uint64)[valid])
        del batches
        if out[columns[0]]:
            yield {c: np.concatenate(v) for c, v in out.items()}


def build(ref: ix.Reference, max_distance: int) -> int:
    """Writes ``ref``'s block tables for ``max_distance`` (module docstring); returns the
    rows they hold (the index rows with a hash). Holds the hashes and one block's sort at
    a time (about 20 bytes a row); the uids are written file by file."""
    parts = [c["phash"] for c in _index_columns(ref, ["phash"])]
    h = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    del parts
    final = folder_of(ref, max_distance)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
    os.makedirs(tmp)
    try:
        np.save(os.path.join(tmp, "hash.npy"), h)
        uid = np.lib.format.open_memmap(os.path.join(tmp, "uid.npy"), "w+", np.uint64, (len(h), 2))
        at = 0
        for c in _index_columns(ref, ["uid_hi", "uid_lo"]):
            n = len(c["uid_hi"])
            uid[at : at + n, 0], uid[at : at + n, 1] = c["uid_hi"], c["uid_lo"]
            at += n
        uid.flush()
        del uid
        for b, (shift, width) in enumerate(partitioned.blocks(max_distance)):
            cell = block_cells(h, shift, width)
            order = np.argsort(cell, kind="stable").astype(np.int32)
            cells = np.zeros((1 << grid_bits(width)) + 1, np.int64)
            np.cumsum(np.bincount(cell, minlength=1 << grid_bits(width)), out=cells[1:])
            np.save(os.path.join(tmp, f"order-{b}.npy"), order)
            np.save(os.path.join(tmp, f"cells-{b}.npy"), cells)
            del cell, order
        meta = {**expected_meta(ref, max_distance), "rows": int(len(h))}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        _replace(tmp, final, ref, max_distance)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return int(len(h))


def _replace(tmp: str, final: str, ref: ix.Reference, max_distance: int) -> None:
    """``tmp`` into place as ``final``: a stale ``final`` is moved aside first; when another
    run put a good one there meanwhile, that one stays."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if state(ref, max_distance) is None:  # another run made it meanwhile
            return
    aside = f"{final}.stale-{uuid.uuid4().hex[:12]}"
    with contextlib.suppress(FileNotFoundError):
        os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def block_cells(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    """Each hash's cell in one block: its block value's top :data:`GRID_BITS` bits."""
    value = (np.asarray(h, np.uint64) >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    cell = value >> np.uint64(width - grid_bits(width))
    return cell.astype(np.uint16 if grid_bits(width) <= 16 else np.int64)


def read_cells(folder: str, max_distance: int) -> list[np.ndarray]:
    return [np.load(os.path.join(folder, f"cells-{b}.npy")) for b in range(max_distance + 1)]


@dataclass(frozen=True)
class CellPartitions:
    """The partitions of a search against block tables: each a range of one block's cells.
    ``maps[b][cell]``: the partition of block ``b``'s cell; ``ranges[p]``: ``(block, first
    cell, end cell)`` of partition ``p``."""

    max_distance: int
    maps: tuple[np.ndarray, ...]
    ranges: tuple[tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return len(self.ranges)

    def __int__(self) -> int:
        return self.count

    def of(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each hash's records (:func:`filtering.dedup.partitioned.shard_records`' group keys,
        ``max_distance + 1`` per hash, interleaved) and their partitions."""
        m = self.max_distance + 1
        g = np.empty(len(hashes) * m, np.uint64)
        part = np.empty(len(hashes) * m, np.int64)
        for b, (shift, width) in enumerate(partitioned.blocks(self.max_distance)):
            g[b::m] = group_keys(hashes, b, shift, width)
            part[b::m] = self.maps[b][block_cells(hashes, shift, width)]
        return g, part


def group_keys(h: np.ndarray, b: int, shift: int, width: int) -> np.ndarray:
    """The partitioned search's group key of block ``b``: its index in the top byte, its value below."""
    value = (np.asarray(h, np.uint64) >> np.uint64(shift)) & np.uint64((1 << width) - 1)
    return (np.uint64(b) << np.uint64(56)) | value


def plan(cells: Sequence[Sequence[np.ndarray]], pool_rows: int, max_distance: int, per_partition: int):
    """Cut each block's cells into partitions of about ``per_partition`` records: the
    references' records per cell (``cells[k][b]``: reference ``k``'s cell starts in block
    ``b``), plus the pool's ``pool_rows`` spread as the references' are."""
    maps, ranges = [], []
    ref_rows = sum(int(c[0][-1]) for c in cells)
    scale = 1.0 + pool_rows / max(1, ref_rows)
    for b, (_, width) in enumerate(partitioned.blocks(max_distance)):
        counts = np.zeros(1 << grid_bits(width), np.float64)
        for c in cells:
            counts += np.diff(c[b])
        if ref_rows == 0:
            counts[:] = pool_rows / len(counts)
        counts *= scale
        before = np.cumsum(counts) - counts
        local = (before // max(1, per_partition)).astype(np.int64)
        _, local = np.unique(local, return_inverse=True)
        local = local.ravel()
        starts = np.r_[0, np.flatnonzero(np.diff(local)) + 1]
        ends = np.r_[starts[1:], len(local)]
        maps.append((local + len(ranges)).astype(np.int32))
        ranges.extend((b, int(s), int(e)) for s, e in zip(starts, ends, strict=True))
    return CellPartitions(max_distance, tuple(maps), tuple(ranges))


@dataclass(frozen=True)
class RefSlice:
    """One reference's records of one partition: its tables' folder, the block, the slice of ``order-<b>.npy``."""

    ref: int  # position in ``against``
    folder: str
    block: int
    start: int
    stop: int


def slices(folders: Sequence[str], cells: Sequence[Sequence[np.ndarray]], partitions: CellPartitions):
    """Per partition, each reference's :class:`RefSlice` (empty ones left out)."""
    out = []
    for b, c0, c1 in partitions.ranges:
        here = []
        for k, (folder, c) in enumerate(zip(folders, cells, strict=True)):
            start, stop = int(c[b][c0]), int(c[b][c1])
            if stop > start:
                here.append(RefSlice(k, folder, b, start, stop))
        out.append(here)
    return out


def read_slice(s: RefSlice, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, ordinals)`` of one :class:`RefSlice`."""
    order = np.load(os.path.join(s.folder, f"order-{s.block}.npy"), mmap_mode="r")
    ordinals = np.array(order[s.start : s.stop])
    hashes = np.load(os.path.join(s.folder, "hash.npy"), mmap_mode="r")
    return np.asarray(hashes[ordinals]), ordinals


def read_uids(folder: str, ordinals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uid = np.load(os.path.join(folder, "uid.npy"), mmap_mode="r")
    pairs = np.asarray(uid[np.asarray(ordinals, np.int64)])
    return pairs[:, 0].copy(), pairs[:, 1].copy()
