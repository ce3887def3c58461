"""Source stage for ``input.datacomp_metadata``: DataComp's own metadata, no images needed.

DataComp (Gadre et al. 2023) ships each pool shard as ``NNNNNNNN.parquet`` (uid, url,
text, original size, precomputed CLIP B/32 and L/14 similarity scores, face boxes,
sha256) next to ``NNNNNNNN.npz`` (float16 CLIP embeddings ``b32_img``, ``b32_txt``,
``l14_img``, ``l14_txt``, rows aligned with the parquet). This stage reads the parquets
into the pool as they are, so ``clip_score`` thresholds DataComp's own scores and
embedding steps read DataComp's own embeddings: nothing is recomputed and no model (and
no torch) is loaded.

Only what a run uses is read, and only when it is used. The pool holds uid, key, the
numeric columns and whatever a filter asks for. The other string columns (url, text,
sha256) are left on disk as late columns and read shard by shard when the subset is
written. The bulky ``face_bboxes`` lists are read only when a filter asks for them.
Embeddings are read per shard and per array on demand.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import zipfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filtering.errors import InputError, PoolsiftError
from filtering.io.arrow import conform, unify_shards
from filtering.io.paths import file_info, get_fs, is_local, local_path, open_file
from filtering.pool import LateColumns, Pool, ShardPart
from filtering.sources import DATACOMP
from filtering.stages.base import RunContext, SourceStage
from filtering.tasks import thread_pool, worker_count

SCORE_FIELDS = ("clip_b32_similarity_score", "clip_l14_similarity_score")
EMBEDDING_ARRAYS = ("b32_img", "b32_txt", "l14_img", "l14_txt")
# DataComp's parquet columns, in the order the pool keeps them (``text`` becomes ``caption``).
METADATA_COLUMNS = (
    "uid",
    "key",
    "url",
    "text",
    "original_width",
    "original_height",
    *SCORE_FIELDS,
    "sha256",
    "face_bboxes",
)
ON_REQUEST = frozenset({"face_bboxes"})  # nested lists: read only when a filter needs them
DERIVED = ("source_shard", "caption")
# Not DataComp's, read when a shard carries it: a 64-bit perceptual hash of the image
# (uint64), for ``dedup: {method: perceptual}`` on metadata (a shard without it is named).
OPTIONAL = ("phash",)


@dataclass(frozen=True)
class DataCompShard:
    stem: str
    parquet: str
    npz: str | None


def list_shards(metadata_dir: str) -> list[DataCompShard]:
    """The ``*.parquet`` files of a DataComp metadata folder (local or fsspec URL), sorted,
    each with its ``.npz`` when present."""
    if is_local(metadata_dir):  # no fsspec import for local runs
        root, prefix = os.path.abspath(local_path(metadata_dir)), ""
        if not os.path.exists(root):
            raise InputError(f"input.datacomp_metadata: no such directory {metadata_dir!r}")
        if not os.path.isdir(root):
            raise InputError(f"input.datacomp_metadata: {metadata_dir!r} is not a directory")
        names = [os.path.join(root, n) for n in os.listdir(root)]
    else:
        fs, root = get_fs(metadata_dir)
        prefix = metadata_dir.split("://", 1)[0] + "://"
        try:
            names = fs.ls(root, detail=False)
        except FileNotFoundError as e:
            raise InputError(f"input.datacomp_metadata: no such directory {metadata_dir!r}") from e
        if not fs.isdir(root):
            raise InputError(f"input.datacomp_metadata: {metadata_dir!r} is not a directory")
    files = {posixpath.basename(n.rstrip("/")): n for n in names}
    shards = []
    for name in sorted(files):
        if not name.endswith(".parquet"):
            continue
        stem = name[: -len(".parquet")]
        npz = files.get(f"{stem}.npz")
        shards.append(DataCompShard(stem, prefix + files[name], prefix + npz if npz else None))
    if not shards:
        raise InputError(f"input.datacomp_metadata: no .parquet files in {metadata_dir!r}")
    return shards


class DataCompStage(SourceStage):
    """Builds the pool from DataComp's per-shard parquet metadata and npz embeddings."""

    name = "datacomp"
    info = DATACOMP
    no_embeddings = "input.datacomp_metadata has no .npz next to every .parquet (DataComp's embedding files)"

    def __init__(self, metadata_dir: str, cache_root: str):
        self.metadata_dir = metadata_dir
        self.cache_root = cache_root  # nothing is computed, so nothing is cached
        self.requested: set[str] = set()
        self._shards: list[DataCompShard] | None = None
        self._layout: _Layout | None = None  # the whole pool's columns, for one-shard pools (stream_prepare)

    def provides(self) -> set[str]:
        # Static: validating a config must not read data. Columns a given pool lacks are
        # reported when it is read.
        return set(METADATA_COLUMNS) | set(DERIVED) | set(OPTIONAL)

    def request(self, columns: set[str]) -> None:
        """Columns some filter reads; on-request columns among them are read too."""
        self.requested |= set(columns)

    def check_inputs(self) -> None:
        self._shards = list_shards(self.metadata_dir)

    def embeddings(self) -> tuple[tuple[str, ...], str | None] | None:
        """The npz arrays every shard has (the folder listed, one npz's zip directory read);
        None when the folder holds no metadata yet (``check_inputs`` says so at run time)."""
        if self._shards is None:
            try:
                self._shards = list_shards(self.metadata_dir)
            except InputError:
                return None
        kinds = _embedding_kinds(self._shards)
        return kinds, default_embedding(kinds)

    def _pool(self, ctx: RunContext, shard: DataCompShard, table: pa.Table, wanted, late, read_late, kinds) -> Pool:
        """The one-shard pool of ``shard`` from its eager columns ``table``; ``read_late(part,
        mask)`` gives the late columns. ``wanted`` (each distinct schema's columns) and
        ``kinds`` (the embeddings every shard has) are the whole pool's."""
        parts = [ShardPart(shard.parquet, shard.stem, 0, table.num_rows)]
        table = _with_source_shard(table, [shard], [table.num_rows])
        npz = {shard.stem: shard.npz}
        order = _pool_order([c for w in wanted for c in w], self.requested)
        late_columns = None
        if late:
            late_columns = LateColumns(
                schema=pa.schema([(c, late.types[c]) for c in order if c in late.types]),
                order=tuple(order),
                read=read_late,
            )
        ctx.stage_info[self.name] = {
            "metadata_dir": self.metadata_dir,
            "shards": 1,
            "rows": table.num_rows,
            "columns": order,
            "embeddings": list(kinds),
        }
        return Pool(
            table=table,
            parts=parts,
            embedding_loader=lambda kind, part: load_npz_array(npz[part.sid], kind, part),
            embedding_ref=lambda kind, part: functools.partial(load_npz_array, npz[part.sid], kind, part),
            embedding_kinds=kinds,
            default_embedding=default_embedding(kinds),
            late=late_columns,
            # DataComp ships no key: the pool's key is the uid, which the dropped rows need not repeat
            artifacts={"key_is_uid": not any("key" in w for w in wanted)},
        )

    # --- the streaming plan (pipelines/executors/streaming.py) --------------------------

    def stream_why_not(self) -> str | None:
        return None  # local or remote (fsspec): every read opens the shard's own files

    def stream_shards(self) -> list[DataCompShard]:
        if self._shards is None:
            self._shards = list_shards(self.metadata_dir)
        return self._shards

    def stream_prepare(self, ctx: RunContext) -> None:
        """The whole pool's columns (:class:`_Layout`) from every shard's footer: shards
        that differ in columns or types give the columns and types a permissive
        concatenation of their tables gives, which each one-shard pool is cast and filled
        to; shards whose types do not unify stop the run in one line."""
        shards = self.stream_shards()
        with thread_pool(worker_count(least=8, cap=min(len(shards), 16))) as pool:  # footers: I/O-bound
            schemas = [s.remove_metadata() for s in pool.map(_read_schema, shards)]  # in shard order
        self._layout = self._layout_of(shards, schemas)  # shards that cannot unify: an InputError naming two

    def _layout_of(self, shards: list[DataCompShard], schemas: list[pa.Schema]) -> _Layout:
        # Each distinct schema once, in the order the shards first have it: the same columns,
        # order and types as every shard's (a pool of many shards has few schemas).
        distinct: dict[pa.Schema, DataCompShard] = {}
        for shard, schema in zip(shards, schemas, strict=True):
            distinct.setdefault(schema, shard)
        schemas = list(distinct)
        wanted = [self._columns_for(schema, s.parquet) for schema, s in distinct.items()]
        late = self._late_columns(schemas, wanted)
        late_raw = late.raw if late else ()
        eager = [
            _normalised_schema(pa.schema([schema.field(c) for c in w if c not in late_raw]), self.requested)
            for schema, w in zip(schemas, wanted, strict=True)
        ]
        names = [s.parquet for s in distinct.values()]
        schema = unify_shards(eager, names, "input.datacomp_metadata") if len(eager) > 1 else eager[0]
        return _Layout(tuple(tuple(w) for w in wanted), late, schema, _embedding_kinds(shards))

    def shard_scores(self, shard: DataCompShard, names: list[str]) -> dict[str, np.ndarray]:
        with naming(shard.parquet), open_file(shard.parquet) as f:
            table = pq.ParquetFile(f).read(columns=list(dict.fromkeys(names)), use_threads=False)
        schema = self._layout.schema if self._layout is not None else table.schema
        # in the whole pool's type (a score float32 in one shard and float64 in another: float64)
        types = {n: schema.field(n).type if n in schema.names else table.schema.field(n).type for n in names}
        return {n: table.column(n).cast(types[n]).to_numpy(zero_copy_only=False) for n in names}

    def shard_rows(self, shard: DataCompShard) -> int:
        with naming(shard.parquet), open_file(shard.parquet) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def shard_pool(self, shard: DataCompShard, ctx: RunContext) -> Pool:
        """One shard's pool (the whole pool's columns and types, :meth:`stream_prepare`),
        from one read of every column it needs, on this thread: the streaming plan's workers already keep every
        core busy, and the late columns, read with the rest, are cut from memory for the
        kept rows instead of opening and decoding the file again."""
        stage = DataCompStage(self.metadata_dir, self.cache_root)
        stage._shards = [shard]
        stage.request(set(self.requested))
        ctx.inputs.extend(_input_records([shard]))
        with naming(shard.parquet), open_file(shard.parquet) as f:
            pf = pq.ParquetFile(f)
            layout = self._layout or stage._layout_of([shard], [pf.schema_arrow.remove_metadata()])
            wanted = stage._columns_for(pf.schema_arrow, shard.parquet)
            raw = pf.read(columns=wanted, use_threads=False).replace_schema_metadata(None)
        late = layout.late
        late_raw = late.raw if late else ()
        table = conform(
            _normalise(raw.select([c for c in wanted if c not in late_raw]), requested=stage.requested), layout.schema
        )
        held = raw.select([c for c in late_raw if c in wanted])
        return stage._pool(
            ctx,
            shard,
            table,
            [list(w) for w in layout.wanted],
            late,
            lambda part, mask: _late_table(held, late, mask),
            layout.kinds,
        )

    def shard_record(self, ctx: RunContext, pool: Pool) -> dict:
        return ctx.stage_info.get(self.name, {})

    def stream_record(self, ctx: RunContext, records: list, shards: list, rows: int) -> None:
        ctx.inputs.extend(_input_records(shards))
        ctx.stage_info[self.name] = {**records[0], "shards": len(shards), "rows": rows}

    def skeleton_pool(self, counts: list[int]) -> Pool:
        """A pool of shard parts and embeddings only (no column, nothing per row): what
        ``ImageClustersStage.find_targets`` reads."""
        shards = self.stream_shards()
        parts, start = [], 0
        for shard, n in zip(shards, counts, strict=True):
            parts.append(ShardPart(shard.parquet, shard.stem, start, start + n))
            start += n
        npz = {s.stem: s.npz for s in shards}
        kinds = _embedding_kinds(shards)
        return Pool(
            table=pa.table({"rows": pa.nulls(start)}),  # a null-typed column: a row count, no buffers
            parts=parts,
            embedding_loader=lambda kind, part: load_npz_array(npz[part.sid], kind, part),
            embedding_ref=lambda kind, part: functools.partial(load_npz_array, npz[part.sid], kind, part),
            embedding_kinds=kinds,
            default_embedding=default_embedding(kinds),
        )

    def _late_columns(self, schemas: list[pa.Schema], wanted: list[list[str]]) -> _LateSpec | None:
        """String columns no filter reads (url, text, sha256...): read only when writing the subset."""
        need = {"text" if c == "caption" else c for c in self.requested}
        fields: dict[str, list[pa.Field]] = {}
        for schema, names in zip(schemas, wanted, strict=True):
            for name in names:
                if name in ("uid", "key") or name in need:
                    continue
                f = schema.field(name)
                if (
                    pa.types.is_string(f.type)
                    or pa.types.is_large_string(f.type)
                    or pa.types.is_binary(f.type)
                    or pa.types.is_large_binary(f.type)
                ):
                    fields.setdefault(name, []).append(f)
        if not fields:
            return None
        types = {}
        for name, fs in fields.items():
            unified = pa.unify_schemas([pa.schema([f]) for f in fs], promote_options="permissive").field(name).type
            types["caption" if name == "text" else name] = pa.string() if name == "text" else unified
        return _LateSpec(raw=tuple(fields), types=types)

    def _columns_for(self, schema: pa.Schema, path: str) -> list[str]:
        present = set(schema.names)
        if "uid" not in present:
            raise InputError(f"input.datacomp_metadata: {path} has no uid column (columns: {schema.names})")
        need = {"text" if c == "caption" else c for c in self.requested} - {"key", "source_shard"}
        missing = need - present
        if missing:
            raise InputError(
                f"input.datacomp_metadata: {path} lacks column(s) {sorted(missing)} that the filters need "
                f"(columns: {schema.names})"
            )
        wanted = []
        for f in schema:
            if f.name in ON_REQUEST or pa.types.is_nested(f.type):
                if f.name in self.requested:
                    wanted.append(f.name)
            else:
                wanted.append(f.name)
        return wanted


@dataclass(frozen=True)
class _LateSpec:
    raw: tuple[str, ...]  # parquet column names
    types: dict[str, pa.DataType]  # pool name -> type shared by every shard


@dataclass(frozen=True)
class _Layout:
    """The whole pool's columns, from the shards' footers (the shard plan's ``stream_prepare``)."""

    wanted: tuple[tuple[str, ...], ...]  # each distinct schema's columns read (parquet names), in shard order
    late: _LateSpec | None
    schema: pa.Schema  # the eager columns, unified as a permissive concatenation of the shards unifies them
    kinds: tuple[str, ...]  # the embedding arrays every shard has


class DataCompReadError(PoolsiftError):
    """A metadata file that cannot be read: one line naming the file and the cause (exit 1)."""


@contextlib.contextmanager
def naming(path: str):
    """Errors from reading ``path`` (Arrow, zip, numpy, the file system) as one line naming it."""
    try:
        yield
    except PoolsiftError:
        raise
    except (pa.ArrowException, OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        cause = " ".join(str(e).split()) or type(e).__name__
        if len(cause) > 200:
            cause = cause[:197] + "..."
        raise DataCompReadError(f"input.datacomp_metadata: cannot read {path}: {cause}") from e


def _read_schema(shard: DataCompShard) -> pa.Schema:
    with naming(shard.parquet), open_file(shard.parquet) as f:
        return pq.ParquetFile(f).schema_arrow


def _late_table(table: pa.Table, late: _LateSpec, mask: np.ndarray | None) -> pa.Table:
    """The pool's late columns (``late.types``) from a shard's raw ``table`` of them, for
    the rows ``mask`` selects (None: all rows)."""
    if mask is not None:
        table = table.filter(pa.array(mask))
    n = table.num_rows
    columns = []
    for name, type_ in late.types.items():
        raw = "text" if name == "caption" else name
        columns.append(table.column(raw).cast(type_) if raw in table.column_names else pa.nulls(n, type_))
    return pa.Table.from_arrays(columns, names=list(late.types))


def _pool_order(raw_names: list[str], requested: set[str]) -> list[str]:
    """Pool column order from the parquet column names: uid, key, source_shard, caption,
    then DataComp's columns in DataComp's order, then any others as found."""
    raw = list(dict.fromkeys(raw_names))
    order = ["uid", "key", "source_shard"]
    if "text" in raw:
        order.append("caption")
        if "text" in requested:
            order.append("text")
    order += [c for c in METADATA_COLUMNS if c in raw and c not in order and c != "text"]
    order += [c for c in raw if c not in order and c != "text"]
    return order


def _normalise(table: pa.Table, requested: set[str]) -> pa.Table:
    """DataComp columns -> pool columns: ``text`` -> ``caption``, ``key`` defaults to ``uid``,
    known columns first in DataComp's order (:func:`_pool_fields`)."""
    return pa.table(
        {
            name: table.column(raw).cast(pa.string()) if as_string else table.column(raw)
            for name, raw, as_string in _pool_fields(table.column_names, requested)
        }
    )


def _normalised_schema(schema: pa.Schema, requested: set[str]) -> pa.Schema:
    """The schema :func:`_normalise` gives a table of ``schema``, without building one (a
    table, even empty, would load pandas into the streaming plan's driver)."""
    return pa.schema(
        [
            (name, pa.string() if as_string else schema.field(raw).type)
            for name, raw, as_string in _pool_fields(schema.names, requested)
        ]
    )


def _pool_fields(names: list[str], requested: set[str]) -> list[tuple[str, str, bool]]:
    """(pool name, parquet name, as string) of the pool's columns from a shard's columns ``names``."""
    out = [("uid", "uid", True), ("key", "key" if "key" in names else "uid", True)]
    if "text" in names:
        out.append(("caption", "text", True))
        if "text" in requested:
            out.append(("text", "text", True))
    taken = {name for name, _, _ in out}
    for name in [*(c for c in METADATA_COLUMNS if c in names), *names]:
        if name not in taken and name != "text":
            out.append((name, name, False))
            taken.add(name)
    return out


def _with_source_shard(table: pa.Table, shards: list[DataCompShard], counts: list[int]) -> pa.Table:
    """Insert ``source_shard`` (the parquet path) after ``key``, built from a dictionary
    instead of one Python string per row."""
    indices = pa.array(np.repeat(np.arange(len(shards), dtype=np.int32), counts))
    dictionary = pa.array([s.parquet for s in shards], pa.string())
    column = pa.DictionaryArray.from_arrays(indices, dictionary).cast(pa.string())
    return table.add_column(table.column_names.index("key") + 1, "source_shard", column)


def default_embedding(kinds: tuple[str, ...]) -> str | None:
    preferred = DataCompStage.info.default_embedding
    return preferred if preferred in kinds else (kinds[0] if kinds else None)


def _embedding_kinds(shards: list[DataCompShard]) -> tuple[str, ...]:
    """The npz arrays present in every shard (read from the first npz's zip directory only)."""
    if any(s.npz is None for s in shards):
        return ()
    with open_file(shards[0].npz) as f, np.load(f) as npz:
        names = set(npz.files)
    return tuple(k for k in EMBEDDING_ARRAYS if k in names) + tuple(sorted(names - set(EMBEDDING_ARRAYS)))


def load_npz_array(path: str | None, kind: str, part: ShardPart) -> np.ndarray:
    """One embedding array of one shard.

    DataComp writes its npz files uncompressed (``np.savez``), so for local files the
    array is memory-mapped straight out of the zip: only the rows a step touches are
    read. Compressed or remote npz files load that one member (an npz is a zip).
    """
    if path is None:
        raise InputError(f"input.datacomp_metadata: no .npz next to {part.url}, so embedding {kind!r} is unavailable")
    arr = npz_array(path, kind)
    if arr.ndim != 2 or arr.shape[0] != part.n:
        raise InputError(f"{path}: {kind} has shape {arr.shape}, but {part.url} has {part.n} rows")
    return arr


def npz_array(path: str, kind: str) -> np.ndarray:
    """Array ``kind`` of an npz file: memory-mapped when it is local and uncompressed."""
    with naming(path):
        arr = _mmap_npz_member(path.removeprefix("file://"), kind) if is_local(path) else None
        if arr is None:
            with open_file(path) as f, np.load(f) as npz:
                arr = _member(npz, path, kind)
    return arr


def _mmap_npz_member(path: str, kind: str) -> np.ndarray | None:
    """Memory-map ``kind.npy`` inside an uncompressed npz; None when that is not possible."""
    import struct

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{kind}.npy")
        except KeyError:
            raise InputError(
                f"{path}: no array {kind!r}; it has {sorted(n.removesuffix('.npy') for n in zf.namelist())}"
            ) from None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(np.lib.format.read_magic(f))
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            return None
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _member(npz, path: str, kind: str) -> np.ndarray:
    if kind not in npz.files:
        raise InputError(f"{path}: no array {kind!r}; it has {sorted(npz.files)}")
    return npz[kind]


def _input_records(shards: list[DataCompShard]) -> list[dict]:
    records = []
    for s in shards:
        for path in (s.parquet, s.npz):
            if path is not None:
                records.append({"path": path, **file_info(path)})
    return records
