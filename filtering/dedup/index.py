"""The compact index of what a run kept (issue 25): ``DIR/index/``, read by ``dedup: {against: [...]}``.

Every run writes one beside its subset: for each kept row its uid (two uint64, DataComp's
halves), the sha256 of the stored bytes (32 bytes; null when the pool has none), the
perceptual hash (uint64; null when the run did not compute ``phash``), and where its
embeddings are (``shard``: the row's source shard, an index into ``index.json``'s
``shards``; ``row``: the row's position in that shard). About 64 bytes a kept row, plus
a validity bit per nullable column; the file is uncompressed (sha256 digests do not
compress) so that a later run memory-maps the one partition it reads.

Embeddings are not copied (512 to 768 float16 per row would be 16 to 24 times the rest):
``shards[k]`` names the source shard as the run read it, and the embeddings are where the
run found them, by input kind: DataComp metadata's ``.npz`` next to the ``.parquet``;
WebDataset's in the output folder's ``cache/`` (which moves with the folder), keyed by the
shard's name. A run that cannot find them there cannot use the index for ``semantic``.

Layout: the dedup search's spill format (:mod:`filtering.dedup.partitioned`), so a 10M-row
reference is read one partition at a time, never whole. Rows are cut into
:data:`PARTITIONS` partitions by the first byte of their sha256 (uniform: a digest), or of
their uid when they have none; ``part-NNNNN.arrow`` (one per source shard with kept rows,
in pool order) is an Arrow IPC file whose record batches each hold one partition's rows,
and ``index.json`` lists each file's batch-to-partition map. The exact search against a
reference cuts the new pool's rows by the same byte and joins partition by partition; the
perceptual search reads the reference's files batch by batch into its own partitions.

The shard plan writes each shard's file in the filter-and-write worker and assembles
them at commit. ``poolsift index DIR`` builds
one for an output folder written before indexes existed (from its subset parts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filtering.dedup import partitioned
from filtering.io.paths import get_fs, is_local, join, local_path
from filtering.uid import _PAIR_VALUE, uids_to_u8u8

INDEX = "index"  # the folder in an output
META = "index.json"
VERSION = 1
PARTITIONS = 256  # by the first byte of the sha256 (or uid)
SCHEMA = pa.schema(
    [
        ("uid_hi", pa.uint64()),
        ("uid_lo", pa.uint64()),
        ("sha256", pa.binary(32)),
        ("phash", pa.uint64()),
        ("shard", pa.int32()),
        ("row", pa.int32()),
    ]
)
ROW_BYTES = 64  # uid 16, sha256 32, phash 8, shard 4, row 4 (plus a validity bit per nullable column)


def sha256_bytes(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Hex sha256 strings as ``(digests (N, 32) uint8, valid)``: null, or anything but 64 hex
    digits (either case), is not valid (its digest row is zero)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    out = np.zeros((n, 32), np.uint8)
    if n == 0:
        return out, np.zeros(0, bool)
    if pa.types.is_fixed_size_binary(column.type):
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        filled = column.fill_null(b"\0" * column.type.byte_width)
        raw = np.frombuffer(filled.buffers()[1], np.uint8)[filled.offset * 32 : (filled.offset + n) * 32]
        return raw.reshape(n, 32).copy(), valid
    column = column.cast(pa.large_string())
    valid = pc.fill_null(pc.equal(pc.utf8_length(column), 64), False).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(valid)
    if len(rows):
        good = column.take(pa.array(rows))
        offsets = np.frombuffer(good.buffers()[1], np.int64)[good.offset : good.offset + len(good) + 1]
        data = np.frombuffer(good.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        values = _PAIR_VALUE[np.ascontiguousarray(data.reshape(len(rows), 64)).view("<u2")]
        bad = (values > 0xFF).any(axis=1)
        out[rows] = values.astype(np.uint8)
        if bad.any():
            out[rows[bad]] = 0
            valid[rows[bad]] = False
    return out, valid


def fixed_digests(digests: np.ndarray, valid: np.ndarray) -> pa.Array:
    """``(N, 32)`` digests as Arrow ``binary(32)``, null where not ``valid``."""
    n = len(digests)
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
    data = pa.py_buffer(np.ascontiguousarray(digests, np.uint8).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [bitmap, data], null_count=int(n - valid.sum()))


def partition_of(digests: np.ndarray, valid: np.ndarray, uid_hi: np.ndarray) -> np.ndarray:
    """Each row's partition: its sha256's first byte, or its uid's when it has none."""
    return np.where(valid, digests[:, 0] if len(digests) else 0, uid_hi >> np.uint64(56)).astype(np.int64)


def index_records(table: pa.Table, rows: np.ndarray, shard: int, phash: np.ndarray | None = None) -> pa.Table:
    """The index rows of ``table`` (kept rows: ``uid``, ``sha256`` and ``phash`` when it has
    them), ``rows`` their positions in source shard number ``shard``. ``phash`` (with a
    validity mask folded in as None) overrides the table's when given."""
    n = table.num_rows
    u = uids_to_u8u8(table.column("uid").cast(pa.string()))
    if "sha256" in table.column_names:
        digests, valid = sha256_bytes(table.column("sha256"))
    else:
        digests, valid = np.zeros((n, 32), np.uint8), np.zeros(n, bool)
    sha = fixed_digests(digests, valid)
    if phash is not None:
        ph = pa.array(phash, pa.uint64())
    elif "phash" in table.column_names:
        ph = table.column("phash").cast(pa.uint64()).combine_chunks()
    else:
        ph = pa.nulls(n, pa.uint64())
    return pa.table(
        [
            pa.array(u["f0"], pa.uint64()),
            pa.array(u["f1"], pa.uint64()),
            sha,
            ph,
            pa.array(np.full(n, shard, np.int32)),
            pa.array(np.asarray(rows, np.int32)),
        ],
        schema=SCHEMA,
    )


def write_file(path: str, records: pa.Table) -> partitioned.Spilled:
    """One index file: ``records`` sorted into their partitions (one record batch each)."""
    u_hi = records.column("uid_hi").to_numpy()
    digests, valid = sha256_bytes(records.column("sha256"))
    writer = partitioned.SpillWriter(path, PARTITIONS)
    writer.schema = SCHEMA
    writer.add(records, partition_of(digests, valid, u_hi))
    return writer.close()


@dataclass(frozen=True)
class IndexFile:
    name: str  # relative to the index folder
    rows: int
    batches: tuple[int, ...]  # partition of each record batch
    keys: dict[str, int]  # rows with a sha256, with a phash


def key_counts(records: pa.Table) -> dict[str, int]:
    """How many index rows have each search key (a search against a reference without
    them would find nothing: it says so instead)."""
    return {k: records.num_rows - records.column(k).null_count for k in ("sha256", "phash")}


def meta_record(files: list[IndexFile], shards: list[dict], source: str | None, embeddings: list[str]) -> dict:
    return {
        "version": VERSION,
        "partitions": PARTITIONS,
        "rows": int(sum(f.rows for f in files)),
        "with": {k: int(sum(f.keys[k] for f in files)) for k in ("sha256", "phash")},
        "row_bytes": ROW_BYTES,
        "source": source,
        "embeddings": embeddings,
        "files": [{"name": f.name, "rows": f.rows, "batches": list(f.batches)} for f in files],
        "shards": shards,
    }


def write_meta(folder: str, record: dict) -> str:
    from filtering.io.atomic import atomic_write_text

    path = join(folder, META)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def file_name(j: int) -> str:
    return f"part-{j:05d}.arrow"


class IndexBuilder:
    """Writes an output's index as its subset is written: :meth:`add` per source shard with
    kept rows (in pool order), :meth:`finish` writes ``index.json``; returns the files written."""

    def __init__(self, folder: str, source: str | None, embeddings: Iterable[str] = ()):
        self.folder, self.source, self.embeddings = folder, source, list(embeddings)
        self.files: list[IndexFile] = []
        _makedirs(folder)

    def add(self, table: pa.Table, rows: np.ndarray, shard: int, phash: np.ndarray | None = None) -> None:
        if table.num_rows == 0:
            return
        name = file_name(len(self.files))
        records = index_records(table, rows, shard, phash)
        self.add_file(name, write_file(join(self.folder, name), records), key_counts(records))

    def add_file(self, name: str, spilled: partitioned.Spilled, keys: dict[str, int]) -> None:
        self.files.append(IndexFile(name, spilled.records, tuple(int(p) for p in spilled.parts), keys))

    def finish(self, shards: list[str]) -> list[str]:
        """``shards``: every source shard's url, in pool order (what ``shard`` numbers)."""
        record = meta_record(self.files, [{"source_shard": s} for s in shards], self.source, self.embeddings)
        meta = write_meta(self.folder, record)
        _remove_stale(self.folder, {f.name for f in self.files} | {META})
        return [join(self.folder, f.name) for f in self.files] + [meta]


def _makedirs(folder: str) -> None:
    if is_local(folder):
        os.makedirs(local_path(folder), exist_ok=True)
    else:
        fs, p = get_fs(folder)
        fs.makedirs(p, exist_ok=True)


def _remove_stale(folder: str, keep: set[str]) -> None:
    """An earlier index's files; and its block tables (``blocks-d<k>/``, made from that index
    by a search against it: :mod:`filtering.dedup.ref_blocks`)."""
    if is_local(folder):
        import shutil

        for name in os.listdir(local_path(folder)):
            if name not in keep and (name.endswith(".arrow") or name == META):
                os.remove(os.path.join(local_path(folder), name))
            elif name.startswith("blocks-d") and os.path.isdir(os.path.join(local_path(folder), name)):
                shutil.rmtree(os.path.join(local_path(folder), name), ignore_errors=True)
        return
    fs, p = get_fs(folder)
    for path in fs.glob(f"{p}/*.arrow"):
        if path.rsplit("/", 1)[-1] not in keep:
            fs.rm(path)


def shard_index_tables(pool, keep: np.ndarray, tables: Iterable[pa.Table], add) -> Iterator[pa.Table]:
    """``tables`` (the subset's kept rows, in pool order, cut anyhow) passed through; each
    source shard's kept rows handed on the way to ``add(table, rows, shard, phash)``
    (``rows``: their positions in the shard; ``shard``: its position in ``pool.parts``)."""
    parts = [(k, p) for k, p in enumerate(pool.parts) if keep[p.start : p.stop].any()]
    phash = None
    if "phash" in pool.internal and "phash" in pool.table.column_names:  # not an output column: read it here
        phash = pool.table.column("phash")
    it = iter(parts)
    current, pending, need = None, [], 0

    def flush():
        k, part = current
        rows = np.flatnonzero(keep[part.start : part.stop])
        ph = None
        if phash is not None:
            col = phash.slice(part.start, part.n).take(pa.array(rows))
            ph = col.to_numpy(zero_copy_only=False) if col.null_count == 0 else None
        add(pa.concat_tables(pending) if len(pending) > 1 else pending[0], rows, k, ph)

    for table in tables:
        at = 0
        while at < table.num_rows:
            if current is None:
                current = next(it)
                need = int(keep[current[1].start : current[1].stop].sum())
                pending = []
            take = min(need, table.num_rows - at)
            pending.append(table.slice(at, take))
            at += take
            need -= take
            if need == 0:
                flush()
                current = None
        yield table


# -- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """One reference index (a folder holding ``index.json``), as a search reads it."""

    path: str  # the output folder or index folder as named in the config
    folder: str  # the index folder
    rows: int
    files: tuple[tuple[str, np.ndarray], ...]  # (file url, partition per batch)
    with_keys: dict[str, int] | None = None  # rows with a sha256, with a phash
    source: str | None = None  # the input kind of the run that wrote it ("datacomp", "webdataset")
    shards: tuple[str, ...] = ()  # each source shard's url, as the ``shard`` column numbers them
    embeddings: tuple[str, ...] = ()  # the embedding kinds that run had

    def pieces(self, partition: int) -> list[tuple[str, np.ndarray]]:
        """The ``(file, batch indices)`` that hold ``partition``'s rows."""
        out = []
        for url, parts in self.files:
            at = np.flatnonzero(parts == partition)
            if len(at):
                out.append((url, at))
        return out

    def all_pieces(self) -> list[tuple[str, np.ndarray]]:
        return [(url, np.arange(len(parts))) for url, parts in self.files if len(parts)]


def find_index(path: str) -> str | None:
    """The index folder of ``path`` (an output folder or an index folder), or None."""
    from filtering.io.atomic import exists

    for folder in (path, join(path, INDEX)):
        if exists(join(folder, META)):
            return folder
    return None


def read_reference(path: str, folder: str) -> Reference:
    from filtering.io.paths import open_file

    with open_file(join(folder, META)) as f:
        meta = json.loads(f.read())
    if meta.get("version") != VERSION or meta.get("partitions") != PARTITIONS:
        raise ValueError(f"{join(folder, META)}: index version {meta.get('version')}, this poolsift reads {VERSION}")
    files = tuple((join(folder, f["name"]), np.asarray(f["batches"], np.int32)) for f in meta["files"])
    shards = tuple(s["source_shard"] for s in meta.get("shards", ()))
    return Reference(
        path,
        folder,
        int(meta["rows"]),
        files,
        meta.get("with"),
        meta.get("source"),
        shards,
        tuple(meta["embeddings"] or ()),
    )


def embedding_file(ref: Reference, shard: int, kind: str) -> str:
    """Where the embeddings ``kind`` of the reference's source shard number ``shard`` are
    (the module docstring): DataComp's ``.npz`` next to the ``.parquet``; WebDataset's in
    the output folder's ``cache/`` (the scorer cache that wrote them: exactly one)."""
    url = ref.shards[shard]
    if ref.source == "datacomp":
        return url.removesuffix(".parquet") + ".npz"
    from filtering.io.paths import shard_id

    out_dir = ref.folder.rstrip("/").removesuffix("/" + INDEX)
    fs, root = get_fs(join(out_dir, "cache"))
    found = sorted(fs.glob(f"{root}/*/{shard_id(url)}.{kind}.npy"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise FileNotFoundError(f"{what} cached {kind!r} embeddings of {url} under {join(out_dir, 'cache')}")
    return found[0] if is_local(out_dir) else f"{out_dir.split('://', 1)[0]}://{found[0]}"


def embedding_rows(ref: Reference, shard: int, kind: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (positions in the shard, any order) of the reference shard's embeddings ``kind``."""
    from filtering.cache import read_npy

    path = embedding_file(ref, shard, kind)
    if path.endswith(".npz"):
        from filtering.stages.datacomp import npz_array

        arr = npz_array(path, kind)
    else:
        arr = read_npy(path)
    return np.asarray(arr[np.asarray(rows, np.int64)])


def file_records(ref: Reference, file: int) -> pa.Table:
    """Every record of the reference's index file number ``file`` (one source shard's kept rows)."""
    url, parts = ref.files[file]
    return pa.Table.from_batches(partitioned.read_batches([(url, np.arange(len(parts)))]), SCHEMA)


def records_embeddings(ref: Reference, records: pa.Table, kind: str, dtype, key: str, needs: str) -> np.ndarray:
    """The ``kind`` embeddings of index ``records`` (in their order), in ``dtype``, read per
    source shard where the reference's run found them (:func:`embedding_rows`). An index
    built from subset parts (``row`` -1: where each embedding is is unknown) or unreadable
    embeddings stop the run in one line naming ``key`` (the config key) and the reference;
    ``needs`` says what needed them."""
    from filtering.errors import InputError

    shard, row = records.column("shard").to_numpy(), records.column("row").to_numpy()
    if (row < 0).any():
        raise InputError(
            f"{key}: {ref.path}: its index was built from the subset parts (an older output), "
            f"which do not say where each row's embedding is; {needs} needs an index its run wrote"
        )
    out = None
    for s in np.unique(shard):  # one in an index a run wrote
        at = np.flatnonzero(shard == s)
        try:
            part = embedding_rows(ref, int(s), kind, row[at])
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{key}: {ref.path}: its {kind!r} embeddings: {e}") from e
        if out is None:
            out = np.zeros((len(row), part.shape[1]), dtype)
        out[at] = part
    return out if out is not None else np.zeros((0, 0), dtype)


def build_from_output(out_dir: str, folder: str) -> int:
    """An index for an output folder written without one, from its subset parts (uid,
    sha256, phash, source_shard); ``row`` is -1 (the parts do not say where in its shard a
    row was). Returns the rows indexed."""
    import glob

    import pyarrow.parquet as pq

    from filtering.io.paths import open_file

    if is_local(out_dir):
        parts = sorted(glob.glob(os.path.join(glob.escape(local_path(join(out_dir, "subset"))), "part-*.parquet")))
    else:
        fs, p = get_fs(join(out_dir, "subset"))
        parts = sorted(fs.glob(f"{p}/part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no subset/part-*.parquet (not a poolsift output folder?)")
    builder = IndexBuilder(folder, None)
    rows = 0
    shards: list[str] = []
    for part in parts:
        with open_file(part) as f:
            pf = pq.ParquetFile(f)
            names = [c for c in ("uid", "sha256", "phash", "source_shard") if c in pf.schema_arrow.names]
            table = pf.read(columns=names)
        if table.num_rows == 0:
            continue
        shard = table.column("source_shard") if "source_shard" in names else None
        # one file per source shard, as a run writes them
        values = shard.to_numpy(zero_copy_only=False) if shard is not None else np.full(table.num_rows, part)
        cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(values)], strict=True):
            shards.append(str(values[lo]))
            builder.add(table.slice(lo, hi - lo), np.full(hi - lo, -1, np.int32), len(shards) - 1)
            rows += hi - lo
    builder.finish(shards)
    return rows
