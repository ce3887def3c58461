"""Exact and perceptual duplicate search by hash partitioning, with memory that stays flat
as the pool grows (issue 16: "exact by hash partitioning, sorted spill files locally;
perceptual by candidate keys partitioned the same way").

Two steps, each a plain function of picklable arguments so that a process pool (here) or
a Ray task can run it:

1. :func:`emit_shards` (one map task: a few consecutive shards, :func:`task_groups`):
   reads each shard's key columns and writes ``(key, row)`` records, each in the
   partition (of ``P``) chosen by a hash of the key, so every record of one key lands in
   one partition. A task writes one spill file, whatever ``P``: an Arrow IPC file whose
   record batches each hold one partition's records (sorted by partition every
   :data:`FLUSH_BYTES`, so a task's memory is bounded), the batch-to-partition index
   going back to the driver (:class:`Spilled`). With a few tasks per worker, a pool of
   thousands of shards and hundreds of partitions writes a few files per worker, not
   shards x partitions.

   - exact: the key is ``sha256`` (and the caption with ``with_caption``: the partition
     is chosen by ``sha256`` alone, so equal pairs meet too). Rows without ``sha256``
     emit nothing: each is a group of its own, as in the in-memory search.
   - perceptual: by the pigeonhole principle, two 64-bit hashes within Hamming distance
     ``k`` agree exactly on at least one of ``k + 1`` disjoint blocks of their bits
     (Norouzi et al., "Fast Search in Hamming Space with Multi-Index Hashing", CVPR
     2012). Each row emits one record per block, keyed by (block index, block value):
     the candidate keys. Rows without a hash emit nothing.

2. :func:`reduce_partition` (one partition: its record batches in every task's file):
   sorts and groups the records and returns small integer arrays.

   - ``rows, labels``: for each row that took part, the smallest row with the same key
     (exact) or the same hash value (perceptual, from block 0, whose records hold every
     row). Equal labels are one group.
   - perceptual only, ``pairs``: the labels of two *distinct* hash values within distance
     ``k``, found inside each (block, block value) group by multi-index hashing
     (:func:`filtering.dedup.hamming.unique_pairs` with the group as part of the key)
     and verified with the full 64-bit distance. A pair agreeing on several blocks is
     reported only by its first equal block, so by one partition.

:func:`search` runs both (the map tasks given) and returns, for every pool
row, its label (its own row when it took no part) and the pairs: the candidate structure
from which :func:`filtering.dedup.groups.label_edges` forms the same groups as the
in-memory search, for any subset of rows. The driver holds one ``int64`` per row plus the
pairs; a partition holds at most about :data:`RECORDS_PER_PARTITION` records, whatever
the pool size, and verifies at most :data:`CANDIDATES_AT_A_TIME` candidate pairs at once
(``bench/bench_dedup_scale.py``: peak RSS of the process tree 660 MB at 250k rows and
701 MB at 1M, against 518 MB and 1,659 MB for the in-memory search). The labels are row
positions in the pool, so they depend on shard order; the decision (survivor rule,
``duplicate_of``) orders rows by uid and does not.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filtering.dedup.hamming import unique_pairs
from filtering.io.paths import get_fs, is_local, join, local_path

# Records per partition: a worker's memory is about a few times its partition's spill
# (exact: a sha256 string and a row, ~80 bytes; perceptual: 24 bytes).
RECORDS_PER_PARTITION = {"exact": 1 << 17, "perceptual": 1 << 19}
CANDIDATES_AT_A_TIME = 1 << 20  # candidate pairs a partition verifies at once (~80 MB)
DIRECT_BITS = 20  # dense offset tables of at most 2^20 keys (16 MB) per partition
SPILL_VERSION = 1  # bump when the records or labels change meaning (the stage's cache key)
TASKS_PER_WORKER = 4  # map tasks per worker: one spill file each, so files = tasks, not shards x partitions
FLUSH_BYTES = 64 << 20  # a map task sorts and writes its records by partition every ~64 MB


@dataclass(frozen=True)
class SearchSettings:
    method: str  # "exact" | "perceptual"
    max_distance: int = 0  # perceptual: Hamming radius
    with_caption: bool = False  # exact: the caption is part of the key
    key_column: str = "sha256"  # exact: the hash column; perceptual: the 64-bit hash column

    def columns(self) -> list[str]:
        if self.method == "exact":
            return [self.key_column, "caption"] if self.with_caption else [self.key_column]
        return [self.key_column]

    def records_per_row(self) -> int:
        return self.max_distance + 1 if self.method == "perceptual" else 1

    def describe(self) -> dict:
        return {
            "method": self.method,
            "max_distance": self.max_distance if self.method == "perceptual" else None,
            "with_caption": self.with_caption if self.method == "exact" else None,
            "key_column": self.key_column,
            "version": SPILL_VERSION,
        }


def label_column(settings: SearchSettings) -> str:
    """The search's name: its record's key in the manifest (``stages.dedup``), and the
    filter's against record's (``AgainstSettings.column``) stem."""
    if settings.method == "exact":
        return "dedup_label_exact_caption" if settings.with_caption else "dedup_label_exact"
    return f"dedup_label_{settings.key_column}_d{settings.max_distance}"


@dataclass(frozen=True)
class ShardKeys:
    """One shard's rows ``[first_row, first_row + n)``: either its key columns (``table``)
    or a Parquet file to read them from (``path``, read by the worker)."""

    first_row: int
    n: int
    path: str | None = None
    table: pa.Table | None = None

    def __reduce__(self):
        # Pickling a sliced Arrow table sends its whole buffers (every shard would ship the
        # pool); Arrow's IPC stream writes only the slice.
        if self.table is None:
            return (ShardKeys, (self.first_row, self.n, self.path, None))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.table.schema) as w:
            w.write_table(self.table)
        return (_shard_from_ipc, (self.first_row, self.n, sink.getvalue()))

    def read(self, columns: list[str]) -> pa.Table:
        if self.table is not None:
            return self.table.select(columns)
        import pyarrow.parquet as pq

        return pq.read_table(self.path, columns=columns)


def _shard_from_ipc(first_row: int, n: int, buf: pa.Buffer) -> ShardKeys:
    return ShardKeys(first_row, n, table=pa.ipc.open_stream(buf).read_all())


# -- hashing -----------------------------------------------------------------------------


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads any uint64 keys evenly over partitions."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def string_hash64(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uint64 per string, equal for equal strings (a polynomial over the UTF-8 bytes,
    vectorised over Arrow's buffers: no Python object per row). Nulls hash to 0."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    arr = arr.cast(pa.large_binary())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    base = offsets[0]
    total = int(offsets[-1] - base)
    out = np.zeros(n, np.uint64)
    if total:
        longest = int(lengths.max())
        with np.errstate(over="ignore"):
            powers = np.cumprod(np.full(longest, 0x100000001B3, np.uint64), dtype=np.uint64)
            pos = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1] - base, lengths)
            terms = data[base : base + total].astype(np.uint64) * powers[pos]
            nonempty = np.flatnonzero(lengths > 0)
            out[nonempty] = np.add.reduceat(terms, (offsets[:-1] - base)[nonempty])
    with np.errstate(over="ignore"):
        out += lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return np.where(valid, mix64(out), np.uint64(0))


def blocks(max_distance: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of the ``max_distance + 1`` disjoint blocks the 64 bits are cut into."""
    m = max_distance + 1
    base, extra = divmod(64, m)
    out, shift = [], 0
    for b in range(m):
        width = base + (1 if b < extra else 0)
        out.append((shift, width))
        shift += width
    return out


def first_equal_block(u: np.ndarray, v: np.ndarray, max_distance: int) -> np.ndarray:
    """Index of the first block on which ``u`` and ``v`` agree (``max_distance + 1`` when none)."""
    diff = np.bitwise_xor(np.asarray(u, np.uint64), np.asarray(v, np.uint64))
    first = np.full(len(diff), max_distance + 1, np.int64)
    for b, (shift, width) in reversed(list(enumerate(blocks(max_distance)))):
        equal = (diff >> np.uint64(shift)) & np.uint64((1 << width) - 1) == 0
        first[equal] = b
    return first


# -- step 1: emit ------------------------------------------------------------------------


def shard_records(shard: ShardKeys, settings: SearchSettings, partitions: int) -> tuple[pa.Table, np.ndarray]:
    """One shard's records and the partition of each (module docstring, step 1)."""
    table = shard.read(settings.columns())
    rows = shard.first_row + np.arange(table.num_rows, dtype=np.int64)
    key = table.column(settings.key_column)
    valid = key.is_valid().to_numpy(zero_copy_only=False)
    if settings.method == "exact":
        part = (string_hash64(key) % np.uint64(partitions)).astype(np.int64)
        take = np.flatnonzero(valid)
        records = pa.table({"r": rows[take], **{c: table.column(c).take(take) for c in settings.columns()}})
        return records, part[take]
    hashes = np.asarray(key.fill_null(0).to_numpy(), dtype=np.uint64)[valid]
    rows = rows[valid]
    m = settings.max_distance + 1
    g = np.empty(len(rows) * m, np.uint64)  # one record per row and block
    for b, (shift, width) in enumerate(blocks(settings.max_distance)):
        value = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        # The block index in the top byte: blocks are at most 32 bits wide when there are two or more.
        g[b::m] = (np.uint64(b) << np.uint64(56)) | value
    part = (mix64(g) % np.uint64(partitions)).astype(np.int64)
    return pa.table({"g": g, "h": np.repeat(hashes, m), "r": np.repeat(rows, m)}), part


@dataclass(frozen=True)
class Spilled:
    """One map task's spill file: an Arrow IPC file of record batches, each of one
    partition (``parts[i]``: the partition of batch ``i``)."""

    path: str
    parts: np.ndarray  # int32 per record batch
    records: int


class SpillWriter:
    """Appends records to one spill file: buffered up to :data:`FLUSH_BYTES`, then sorted
    by partition and written as one record batch per partition present, so a map task's
    memory is bounded whatever its number of shards, and its file is one, whatever the
    number of partitions."""

    def __init__(self, path: str, partitions: int):
        self.path, self.partitions = path, partitions
        self.schema: pa.Schema | None = None
        self.pending: list[tuple[pa.Table, np.ndarray]] = []
        self.pending_bytes = 0
        self.parts: list[int] = []
        self.records = 0
        self._stack = contextlib.ExitStack()
        self._writer = None

    def add(self, records: pa.Table, part: np.ndarray) -> None:
        if records.num_rows == 0:
            return
        if self.schema is None:
            self.schema = records.schema
        elif records.schema != self.schema:  # e.g. string here, large_string in another shard
            records = records.cast(self.schema)
        self.pending.append((records, part))
        self.pending_bytes += records.nbytes
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        records = pa.concat_tables([t for t, _ in self.pending])
        part = np.concatenate([p for _, p in self.pending])
        self.pending, self.pending_bytes = [], 0
        order = np.argsort(part, kind="stable")
        records = records.take(order).combine_chunks()
        bounds = np.searchsorted(part[order], np.arange(self.partitions + 1))
        del order, part
        if self._writer is None:
            self._writer = pa.ipc.new_file(self._stack.enter_context(_open_write(self.path)), self.schema)
        for p in np.flatnonzero(np.diff(bounds)):
            for batch in records.slice(bounds[p], bounds[p + 1] - bounds[p]).to_batches():
                self._writer.write_batch(batch)
                self.parts.append(int(p))
        self.records += records.num_rows

    def close(self) -> Spilled:
        with self._stack:
            self.flush()
            if self._writer is not None:
                self._writer.close()
        return Spilled(self.path, np.asarray(self.parts, np.int32), self.records)

    def abort(self) -> None:
        """Close the file unfinished (a failed task: its folder is removed with the search's)."""
        self._stack.close()


@contextlib.contextmanager
def _open_write(url: str):
    """A file for a spill file: locally written under a temporary name and renamed; on an
    fsspec file system (``output.dir`` on shared storage) written in place, as an object
    store does atomically. Nobody reads it before its task has returned."""
    if is_local(url):
        path = local_path(url)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
        with pa.OSFile(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
        return
    fs, path = get_fs(url)
    with fs.open(path, "wb") as f:
        yield f


def read_batches(pieces: Sequence[tuple[str, np.ndarray]]) -> list[pa.RecordBatch]:
    """The record batches ``pieces`` names: ``(spill file, batch indices)`` pairs."""
    out = []
    for url, batches in pieces:
        if is_local(url):  # memory-mapped: the batches keep the map open
            reader = pa.ipc.open_file(pa.memory_map(local_path(url)))
            out.extend(reader.get_batch(int(i)) for i in batches)
            continue
        fs, path = get_fs(url)
        with fs.open(path, "rb") as f:
            reader = pa.ipc.open_file(f)
            out.extend(reader.get_batch(int(i)) for i in batches)
    return out


def partition_pieces(spilled: Sequence[Spilled], partitions: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    """For each partition in order, the ``(spill file, batch indices)`` that hold its records."""
    index = []
    for s in spilled:
        order = np.argsort(s.parts, kind="stable")
        index.append((s.path, order, np.searchsorted(s.parts[order], np.arange(partitions + 1))))
    for p in range(partitions):
        yield [(path, order[b[p] : b[p + 1]]) for path, order, b in index if b[p + 1] > b[p]]


def emit_shards(shards: Iterable[ShardKeys], settings: SearchSettings, partitions: int, path: str) -> Spilled:
    """One map task: the records of ``shards`` (read one at a time) into one spill file."""
    writer = SpillWriter(path, partitions)
    try:
        for shard in shards:
            writer.add(*shard_records(shard, settings, partitions))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def task_groups(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Consecutive shards cut into :data:`TASKS_PER_WORKER` map tasks per worker (fewer with
    fewer shards), balanced by rows: each task writes one spill file."""
    tasks = max(1, min(len(sizes), TASKS_PER_WORKER * max(1, workers)))
    ends = np.cumsum(sizes, dtype=np.int64)
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, tasks) / tasks, side="left") + 1 if len(sizes) else []
    bounds = np.unique(np.r_[0, cuts, len(sizes)]).astype(int)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def spill_path(spill_dir: str, task: int) -> str:
    return join(spill_dir, f"t{task:06d}.arrow")


def make_spill_dir(work_dir: str | None, prefix: str) -> str:
    """A new folder for one search's spill files: under ``work_dir`` (a local path or an
    fsspec URL: the output's file system, which every worker of a cluster sees), or in
    the local temporary folder."""
    if work_dir is None or is_local(work_dir):
        folder = local_path(work_dir) if work_dir is not None else None
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
        return tempfile.mkdtemp(prefix=prefix, dir=folder)
    url = join(work_dir, f"{prefix}{uuid.uuid4().hex[:12]}")
    fs, path = get_fs(url)
    fs.makedirs(path, exist_ok=True)
    return url


def remove_spill_dir(url: str) -> None:
    if is_local(url):
        shutil.rmtree(local_path(url), ignore_errors=True)
        return
    fs, path = get_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def without_block(h: np.ndarray, block: np.ndarray, max_distance: int) -> tuple[np.ndarray, int]:
    """Each hash with the bits of its ``block`` cut out (higher bits shifted down), and the
    number of low bits that may be set: the Hamming distance of two hashes equal on that
    block is the distance of the results."""
    table = np.asarray(blocks(max_distance), np.int64)
    shift = table[block, 0].astype(np.uint64)
    width = table[block, 1].astype(np.uint64)
    low = h & ((np.uint64(1) << shift) - np.uint64(1))
    top = shift + width
    high = np.where(top >= 64, np.uint64(0), h >> np.minimum(top, np.uint64(63)))
    return low | (high << shift), 64 - int(table[:, 1].min())


def _block_of(g: np.ndarray, max_distance: int) -> np.ndarray:
    """The block index packed into group keys (``max_distance`` 0: one 64-bit block, no index)."""
    if max_distance == 0:
        return np.zeros(len(g), np.int64)
    return (g >> np.uint64(56)).astype(np.int64)


# -- step 2: reduce ----------------------------------------------------------------------


@dataclass
class PartitionResult:
    rows: np.ndarray  # int64: rows labelled by this partition
    labels: np.ndarray  # int64: the smallest row with the same key / hash value
    pair_a: np.ndarray  # int64 labels: perceptual pairs of distinct values (pair_a < pair_b)
    pair_b: np.ndarray


def _min_row_labels(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each record, the smallest row among records with the same code."""
    order = np.lexsort((rows, codes))
    c = codes[order]
    start = np.r_[True, c[1:] != c[:-1]]
    first_row = rows[order][start]
    group = np.cumsum(start) - 1
    out = np.empty(len(rows), np.int64)
    out[order] = first_row[group]
    return out


def reduce_partition(pieces: Sequence[tuple[str, np.ndarray]], settings: SearchSettings) -> PartitionResult:
    """Groups (and, perceptual, near pairs) among the records of one partition
    (``pieces``: its record batches in the map tasks' spill files)."""
    empty = np.zeros(0, np.int64)
    batches = read_batches(pieces)
    if not batches:
        return PartitionResult(empty, empty, empty, empty)
    if settings.method == "exact":
        t = pa.Table.from_batches(batches).combine_chunks()
        del batches
        rows = t.column("r").to_numpy()
        codes = np.zeros(len(rows), np.int64)
        for c in settings.columns():
            enc = pc.dictionary_encode(t.column(c), null_encoding="encode").combine_chunks()
            idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            _, codes = np.unique(codes * (len(enc.dictionary) + 1) + idx, return_inverse=True)
            codes = codes.ravel().astype(np.int64)
        return PartitionResult(rows, _min_row_labels(codes, rows), empty, empty)

    g, h, r = (np.concatenate([b.column(name).to_numpy() for b in batches]) for name in ("g", "h", "r"))
    del batches
    order = np.lexsort((r, h, g))
    g, h, r = g[order], h[order], r[order]
    del order
    # One entry per (group, hash value); its label is its smallest row (the first, sorted by row).
    first = np.r_[True, (g[1:] != g[:-1]) | (h[1:] != h[:-1])]
    start = np.flatnonzero(first)
    ug, uh, ul = g[start], h[start], r[start]
    # Block 0's records hold every row once: they give each row its label.
    in_block0 = _block_of(g, settings.max_distance) == 0
    rows_out = r[in_block0]
    labels_out = ul[(np.cumsum(first) - 1)[in_block0]]
    del g, h, r, first, start, in_block0
    if settings.max_distance == 0:  # distinct values are never within distance 0
        return PartitionResult(rows_out, labels_out, empty, empty)
    # Inside a group the block's bits are equal: search the other bits only (cut out of the
    # value), or the substring that coincides with the block would put each group in one bucket.
    rest, bits = without_block(uh, _block_of(ug, settings.max_distance), settings.max_distance)
    i, j = unique_pairs(
        rest, settings.max_distance, groups=ug, bits=bits, max_candidates=CANDIDATES_AT_A_TIME, direct_bits=DIRECT_BITS
    )
    del rest
    if len(i):
        # Reported by the first block the two values agree on, so by one partition only.
        block = _block_of(ug[i], settings.max_distance)
        mine = first_equal_block(uh[i], uh[j], settings.max_distance) == block
        i, j = i[mine], j[mine]
    a, b = ul[i], ul[j]
    return PartitionResult(rows_out, labels_out, np.minimum(a, b), np.maximum(a, b))


# -- both steps over a pool ----------------------------------------------------------------


def num_partitions(records: int, kind: str, workers: int = 1) -> int:
    """Enough partitions to bound each one's records, and at least one per worker."""
    return max(1, workers, math.ceil(records / RECORDS_PER_PARTITION[kind]))


@contextlib.contextmanager
def _mapper(workers: int, executor=None):
    """An ordered ``map(fn, args)``: on ``executor`` if given, else on a new process pool
    of ``workers`` (spawned, as every poolsift pool: the driver may hold torch's threads),
    else in this process. At most two tasks per worker are in flight, so the driver holds
    only a few partitions' results at a time."""
    if executor is None and workers <= 1:
        yield map
        return

    from filtering.tasks import process_pool, windowed

    def ordered(pool):
        def run(fn, args):
            return (r for _, r in windowed(pool, fn, ((None, (a,)) for a in args), 2 * max(1, workers) - 1))

        return run

    if executor is not None:
        yield ordered(executor)
        return
    with process_pool(workers) as pool:
        yield ordered(pool)


def _emit_task(args) -> Spilled:
    return emit_shards(*args)


def _reduce_task(args) -> PartitionResult:
    return reduce_partition(*args)


def reduce_spilled(run, spilled: Sequence[Spilled], n: int, settings: SearchSettings, partitions: int):
    """Step 2 over the map tasks' spill files (``run``: an ordered map, local or a task
    pool's): ``(labels, pair_a, pair_b)`` over ``n`` rows."""
    labels = np.arange(n, dtype=np.int64)
    pair_a, pair_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for result in run(_reduce_task, ((pieces, settings) for pieces in partition_pieces(spilled, partitions))):
        labels[result.rows] = result.labels
        pair_a.append(result.pair_a)
        pair_b.append(result.pair_b)
    # Each pair comes from one partition only (first equal block), in partition order.
    return labels, np.concatenate(pair_a), np.concatenate(pair_b)


def search(
    run: Callable,
    emit: Callable,
    emit_args: Callable[[int, str], list],
    n: int,
    settings: SearchSettings,
    workers: int = 1,
    work_dir: str | None = None,
    partitions: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, pair_a, pair_b)`` over ``n`` rows (module docstring): the plan's dedup
    search (``pipelines/executors/dedup_phase.py``) and :func:`search_keys`.

    ``labels[i]`` is the smallest row with the same key (``i`` for a row with no key);
    ``(pair_a, pair_b)`` (perceptual) link labels of distinct hash values within the
    radius. ``run``: an ordered map (a task pool's, or ``map``); ``emit_args(partitions,
    spill_dir)``: the map tasks, each run by ``emit`` (a picklable function writing one
    spill file); the spill folder is made under ``work_dir`` (a local path or an fsspec
    URL) and removed after."""
    partitions = partitions or num_partitions(n * settings.records_per_row(), settings.method, workers)
    spill = make_spill_dir(work_dir, "dedup-spill-")
    try:
        spilled = list(run(emit, emit_args(partitions, spill)))
        return reduce_spilled(run, spilled, n, settings, partitions)
    finally:
        remove_spill_dir(spill)


def search_keys(
    shards: Sequence[ShardKeys],
    n: int,
    settings: SearchSettings,
    workers: int = 1,
    work_dir: str | None = None,
    partitions: int | None = None,
    executor=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`search` over key tables in memory or in files (:class:`ShardKeys`), as the
    plan groups shards into map tasks (:func:`task_groups`); ``workers > 1`` runs emit and
    reduce on a process pool (``executor``: on that one). For tests and benches."""

    def emit_args(partitions: int, spill: str) -> list:
        return [
            ([shards[k] for k in group], settings, partitions, spill_path(spill, t))
            for t, group in enumerate(task_groups([s.n for s in shards], workers))
        ]

    with _mapper(workers, executor) as run:
        return search(run, _emit_task, emit_args, n, settings, workers, work_dir, partitions)


# -- components --------------------------------------------------------------------------------
#
# The groups of duplicates as integers: rows sharing a label, and labels linked by a pair.
# The survivor of each is picked by filtering.dedup.groups.survivors.


def components_of(
    labels: np.ndarray,
    pair_a: np.ndarray,
    pair_b: np.ndarray,
    alive: np.ndarray | None = None,
    copy: bool = True,
) -> np.ndarray:
    """Component per row (an int64 row number naming it; -1 for rows not alive) over the
    alive rows: rows sharing a label, and labels linked by a pair when both labels have an
    alive row. Writes into a copy of ``labels`` (one int64 per row), or with ``copy=False``
    into ``labels`` itself (a caller done with them holds no second per-row array)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(labels)
    present = np.zeros(n, dtype=bool)
    present[labels if alive is None else labels[alive]] = True
    keep = present[pair_a] & present[pair_b]
    a, b = pair_a[keep], pair_b[keep]
    out = labels.copy() if copy else labels
    if len(a):
        # The graph over the labels that some pair names only (not one node per row).
        nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
        inv = inv.ravel()
        graph = coo_matrix((np.ones(len(a), np.int8), (inv[: len(a)], inv[len(a) :])), shape=(len(nodes),) * 2)
        _, cc = connected_components(graph, directed=False)
        # Name each component by its smallest label (a row number, stable across runs).
        smallest = np.full(cc.max() + 1, n, np.int64)
        np.minimum.at(smallest, cc, nodes)
        at = np.minimum(np.searchsorted(nodes, out), len(nodes) - 1)
        hit = np.flatnonzero(nodes[at] == out)
        out[hit] = smallest[cc[at[hit]]]
    if alive is not None:
        out[~alive] = -1
    return out
