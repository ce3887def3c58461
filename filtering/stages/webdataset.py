"""The scoring stage: stream WebDataset shards, decode, CLIP-encode, cache per shard.

For each shard not already cached: samples are read in order, images decoded and
resized by worker processes, then image and text are encoded in batches; the CLIP
score is the cosine similarity of the unit-norm embeddings. Each shard's result — a
table of metadata and scores, plus float16 unit-norm image and text embeddings — is
written atomically; a rerun (or a resumed, killed run) reuses it without loading the
model. Corrupt samples become rows with an ``error`` reason and zero embeddings.

A sample's faults stay with that sample: a duplicated member, an unreadable ``.json``,
an unsafe or non-UTF-8 member name make it a failure row; a metadata field that
cannot be stored (``original_width`` of 1e400 or 3e9, a ``url`` that is not valid
text) is left empty and counted (``manifest.json``, ``stages.score.field_warnings``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from filtering.cache import ShardCache
from filtering.errors import ConfigError, PoolsiftError
from filtering.io.paths import expand_shards, file_info
from filtering.io.reader import RawSample, ShardReadResult, iter_shard, one_line, unsafe_name
from filtering.pool import Pool, ShardPart
from filtering.stages.base import RunContext, SourceInfo, SourceStage
from filtering.stages.img2dataset import STATS_COUNTS, merge_side_parquet, read_stats, side_parquet, source_stamp
from filtering.uid import UidError, resolve_uids

SCORE_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("source_shard", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),  # the source's own (img2dataset: of the downloaded file); see load_pool
        ("image_sha256", pa.string()),  # poolsift's: of the image bytes stored in the shard
        ("phash", pa.uint64()),
        ("image_ext", pa.string()),
        ("clip_score", pa.float32()),
        ("status", pa.string()),  # img2dataset's, from the .json or the shard's parquet
        ("error_message", pa.string()),
        ("exif", pa.string()),
        ("error", pa.string()),
    ]
)
# Source columns dropped from the pool when no sample has them (a plain WebDataset pool).
OPTIONAL_SOURCE_COLUMNS = ("status", "error_message", "exif")
# Bumped when the cached table's meaning changes (2: raw json uid, source and own sha256).
CACHE_FORMAT = 2
EMBEDDING_KINDS = ("image", "text")
DECODE_CHUNK = 32


_INT32_MAX = 2**31 - 1


def _int32(value) -> tuple[int | None, bool]:
    """An int32 column's value from a ``.json`` field, and whether the field was unusable
    (present but not a number in range: left empty and counted)."""
    if value is None:
        return None, False
    try:
        out = int(value)
    except (TypeError, ValueError, OverflowError):  # "abc", [], inf (1e400), nan
        return None, True
    return (out, False) if -_INT32_MAX - 1 <= out <= _INT32_MAX else (None, True)


def _text_ok(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates ("\ud800" in JSON, undecodable bytes in a name)
        return False
    return True


def model_spec(model_cfg) -> dict:
    """What identifies a model's scores: arch, weights (file content for local files), and
    the precision they are computed in on this machine (``auto`` resolved)."""
    pretrained = model_cfg.pretrained
    weights = pretrained
    if pretrained and os.path.isfile(pretrained):
        h = hashlib.sha256()
        with open(pretrained, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        weights = f"sha256:{h.hexdigest()}"
    from filtering.models.clip import precision_key

    precision = precision_key(model_cfg.precision, getattr(model_cfg, "device", "auto"))
    spec = {"arch": model_cfg.arch, "weights": weights, "precision": precision}
    if getattr(model_cfg, "jpeg_draft", False):
        spec["jpeg_draft"] = True  # DCT-downscaled decoding changes pixels slightly
    return spec


@dataclass
class _ShardAcc:
    """Rows of one shard being scored, in read order."""

    url: str
    rows: list[dict]
    image: list[np.ndarray]
    text: list[np.ndarray]
    read: ShardReadResult | None = None


def encode_text_trimmed(model, tokens, length: int | None = None):
    """Encode text trimmed to the batch's longest real token sequence.

    Exact for open_clip's causal text tower: the causal mask means positions after a
    sequence's end-of-text token never influence it, so dropping trailing padding
    columns changes nothing (checked against the padded result in tests). Other text
    towers fall back to the model's own ``encode_text``. ``length`` (the longest real
    sequence) can be given by a caller that knows it, to avoid a device sync.
    """
    import torch
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool
    from torch.nn.functional import normalize

    if not isinstance(model, CLIP) or model.text_pool_type != "argmax" or model.attn_mask is None:
        return model.encode_text(tokens, normalize=True)
    if length is None:
        length = token_length(tokens)
    length = max(1, min(length, tokens.shape[1]))
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type)
    if model.text_projection is not None:
        x = (
            model.text_projection(x)
            if isinstance(model.text_projection, torch.nn.Linear)
            else x @ model.text_projection
        )
    return normalize(x, dim=-1)


# On the CPU, a batch's captions are encoded in up to TEXT_BUCKETS groups of similar
# token length (at least TEXT_BUCKET_ROWS each), each trimmed to its own longest: less
# padding than trimming the whole batch to its longest caption.
TEXT_BUCKETS = 4
TEXT_BUCKET_ROWS = 16


def encode_text_bucketed(model, tokens, buckets: int = TEXT_BUCKETS, min_rows: int = TEXT_BUCKET_ROWS):
    """:func:`encode_text_trimmed` over groups of captions sorted by token length.

    Exact for the same reason trimming is (each caption sees only its own tokens), and
    on the CPU, where cost follows the padded length, about 1.5x faster on captions of
    mixed length (bench/bench_scoring.py). Rows come back in the input order.
    """
    import torch

    k = min(buckets, len(tokens) // min_rows)
    if k <= 1:
        return encode_text_trimmed(model, tokens)
    lengths = (tokens != 0).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    out = None
    for rows in torch.tensor_split(order, k):
        emb = encode_text_trimmed(model, tokens[rows], int(lengths[rows].max()))
        if out is None:
            out = emb.new_empty((len(tokens), emb.shape[1]))
        out[rows] = emb
    return out


def token_length(tokens) -> int:
    """The longest real (non-padding) token sequence in a padded batch."""
    return int((tokens != 0).sum(dim=1).max().item()) if tokens.numel() else 1


def _mha_forward_contiguous(self, query, key, value, **kwargs):
    """``nn.MultiheadAttention.forward`` for ``batch_first`` modules, fed sequence-first contiguous inputs.

    torch's batch-first attention transposes its input to a non-contiguous view before the
    input projection; on CPU a bf16 ``linear`` on such a view falls back to a batched
    matmul against a per-position copy of the weight, about 15x slower than on a
    contiguous input (torch 2.x). Same arithmetic, contiguous layout.
    """
    import torch

    if not self.batch_first:
        return torch.nn.MultiheadAttention.forward(self, query, key, value, **kwargs)
    q = query.transpose(0, 1).contiguous()
    k = q if key is query else key.transpose(0, 1).contiguous()
    v = q if value is query else (k if value is key else value.transpose(0, 1).contiguous())
    self.batch_first = False
    try:
        out, weights = torch.nn.MultiheadAttention.forward(self, q, k, v, **kwargs)
    finally:
        self.batch_first = True
    return out.transpose(0, 1), weights


def contiguous_attention(model) -> None:
    """Route the model's batch-first attention modules through :func:`_mha_forward_contiguous`."""
    import types

    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention) and module.batch_first:
            module.forward = types.MethodType(_mha_forward_contiguous, module)


class _Done:
    """An encoded batch already on the host."""

    def __init__(self, image: np.ndarray, text: np.ndarray):
        self.image, self.text = image, text

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.image, self.text


class _CudaPending:
    """An encoded batch whose device-to-host copy may still be running."""

    def __init__(self, image, text, event, keepalive):
        self.image, self.text, self.event, self.keepalive = image, text, event, keepalive

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.event.synchronize()
        self.keepalive = None
        return self.image.numpy(), self.text.numpy()


class ClipEncoder:
    """Batched image and text encoding with the model's own normalization, on its device.

    Pixels arrive as uint8 NHWC (resized by the decode workers); the float conversion
    and normalization run on the device, under ``torch.inference_mode`` and, for
    ``precision`` bf16/fp16, autocast over the fp32 weights. On CUDA, :meth:`submit`
    stages each batch in pinned memory and copies it on a side stream, so the copy of
    the next batch overlaps the forward pass of the current one; results come back
    through pinned buffers and are waited for only when asked for.
    """

    def __init__(self, clip, channels_last: bool = False):
        import torch

        self.clip = clip
        self.device = torch.device(clip.device)
        self.channels_last = channels_last
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.device.type == "cpu" and clip.autocast_dtype is not None:
            contiguous_attention(clip.model)
        self.dim = int(self._encode_text([""]).shape[1])

    def _encode_text(self, captions: list[str]):
        import torch

        with torch.inference_mode():
            tokens = self.clip.tokenizer(captions).to(self.clip.device)
            return encode_text_trimmed(self.clip.model, tokens).float()

    def _forward(self, x, tokens, length: int):
        """uint8 NHWC pixels and trimmed tokens, both on the device -> unit-norm float32 embeddings."""
        import torch
        from torch.nn.functional import normalize

        clip = self.clip
        dtype = clip.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = clip.tensor_transform(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            img = normalize(clip.model.encode_image(x).float(), dim=-1)
            if self.device.type == "cpu":  # on a GPU the padding costs little and more launches would
                txt = encode_text_bucketed(clip.model, tokens)
            else:
                txt = encode_text_trimmed(clip.model, tokens, length)
            txt = normalize(txt.float(), dim=-1)
        return img, txt

    def submit(self, pixels: np.ndarray, captions: list[str]):
        """Start encoding a batch; returns an object whose ``result()`` gives (image, text) arrays."""
        import torch

        tokens = self.clip.tokenizer(captions)  # one call for the whole batch
        length = token_length(tokens)
        tokens = tokens[:, :length]
        with torch.inference_mode():
            if self.device.type != "cuda":
                img, txt = self._forward(torch.from_numpy(pixels), tokens, length)
                return _Done(img.numpy(), txt.numpy())
            host_x = torch.from_numpy(pixels).pin_memory()
            host_t = tokens.contiguous().pin_memory()
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                x = host_x.to(self.device, non_blocking=True)
                t = host_t.to(self.device, non_blocking=True)
            compute.wait_stream(self._copy_stream)
            # x and t were allocated on the copy stream but are used (and freed) on the compute stream.
            x.record_stream(compute)
            t.record_stream(compute)
            img, txt = self._forward(x, t, length)
            out_img = torch.empty(img.shape, dtype=torch.float32, pin_memory=True)
            out_txt = torch.empty(txt.shape, dtype=torch.float32, pin_memory=True)
            out_img.copy_(img, non_blocking=True)
            out_txt.copy_(txt, non_blocking=True)
            event = torch.cuda.Event()
            event.record(compute)
            return _CudaPending(out_img, out_txt, event, keepalive=(host_x, host_t, img, txt))

    def __call__(self, pixels: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.submit(pixels, captions).result()


class WebDatasetStage(SourceStage):
    """Source stage for ``input.shards``: builds the pool from the per-shard score cache."""

    name = "score"
    info = SourceInfo(
        kind="webdataset", score_field="clip_score", caption_column="caption", images=True, default_embedding="image"
    )

    def __init__(self, shards_spec, model_cfg, cache_root: str, uid_cfg=None, output_dir: str | None = None):
        # Nothing is read here: `poolsift validate` plans the run without touching data.
        self.shards_spec = shards_spec
        self.model_cfg = model_cfg
        self.cache_root = cache_root
        self.uid_cfg = uid_cfg  # pipelines.config.UidConfig; None = the defaults
        self.output_dir = output_dir  # its outputs are never read back as shards

    @property
    def uid_field(self) -> str:
        return getattr(self.uid_cfg, "field", "uid")

    @functools.cached_property
    def urls(self) -> list[str]:
        return expand_shards(self.shards_spec, output_dir=self.output_dir)

    @functools.cached_property
    def cache(self) -> ShardCache:
        spec = {**model_spec(self.model_cfg), "rows": CACHE_FORMAT, "uid_field": self.uid_field}
        return ShardCache(self.cache_root, "score", spec)

    def provides(self) -> set[str]:
        return set(SCORE_SCHEMA.names)

    def check_inputs(self) -> None:
        self.urls  # noqa: B018  (expanding the shard spec raises InputError if nothing matches)

    def embeddings(self) -> tuple[tuple[str, ...], str | None]:
        return EMBEDDING_KINDS, self.info.default_embedding  # the run's CLIP model embeds every image and caption

    def describe(self) -> dict[str, Any]:
        """With this run's score cache, relative to the output directory (``cache/score-<fp>``)."""
        return {**self.info.to_dict(), "score_cache": "cache/" + self.cache.dir.rstrip("/").rsplit("/", 1)[-1]}

    def run(self, ctx: RunContext) -> Pool:
        sources = {u: file_info(u) for u in self.urls}
        todo = [u for u in self.urls if not self.cache.is_done(u, source_stamp(u))]
        if todo:
            ctx.log(f"scoring {len(todo)} of {len(self.urls)} shards ({len(self.urls) - len(todo)} cached)")
            if ctx.executor is not None:
                ctx.executor.score(self, todo, ctx)
            else:
                self.score_local(todo, ctx)
        else:
            ctx.log(f"all {len(self.urls)} shards cached; the model is not loaded")
        info = self.cache.read_info()
        if info:
            ctx.model_info.update(info)
        ctx.inputs.extend({"path": u, **sources[u]} for u in self.urls)
        for u in self.urls:
            if side := side_parquet(u):
                ctx.inputs.append({"path": side, **file_info(side)})
        upstream = self.upstream_stats()
        if upstream:
            ctx.stage_info["img2dataset"] = upstream
        warnings = self.field_warnings()
        if warnings:
            ctx.stage_info.setdefault(self.name, {})["field_warnings"] = warnings
            detail = ", ".join(f"{k} {v}" for k, v in warnings.items())
            ctx.log(f"warning: {sum(warnings.values())} unusable .json fields left empty ({detail})")
        pool = self.load_pool()
        ctx.stage_info["uids"] = pool.artifacts["uids"]
        if pool.artifacts["uids"].get("derived"):
            u = pool.artifacts["uids"]
            ctx.log(
                f"warning: {u['derived']} uid(s) derived from the sample {self._derive_from()} (input.uid), not read from the pool"
            )
        return pool

    def _derive_from(self) -> str:
        return getattr(self.uid_cfg, "derive", "key")

    def upstream_stats(self) -> dict | None:
        """img2dataset's own counts (``NNNNN_stats.json``), summed over the shards that have them."""
        found = [s for u in self.urls if (s := read_stats(u)) is not None]
        parquets = sum(1 for u in self.urls if side_parquet(u))
        if not found and not parquets:
            return None
        totals = {k: sum(int(s.get(k) or 0) for s in found if isinstance(s.get(k), int | float)) for k in STATS_COUNTS}
        return {"shards_with_parquet": parquets, "shards_with_stats": len(found), **totals}

    def load_pool(self) -> Pool:
        tables, parts, start = [], [], 0
        for u in self.urls:
            t = self.cache.read_table(u)
            tables.append(t)
            parts.append(ShardPart(u, self.cache.table_path(u), start, start + t.num_rows))
            start += t.num_rows
        table = pa.concat_tables(tables, promote_options="permissive") if tables else SCORE_SCHEMA.empty_table()
        table, uid_report = self.resolve_uids(table)
        return Pool(
            table=table,
            parts=parts,
            embedding_loader=lambda kind, part: self.cache.read_array(part.url, kind),
            embedding_kinds=EMBEDDING_KINDS,
            default_embedding="image",
            artifacts={"uids": uid_report, "carried_columns": tuple(uid_report.pop("carried_columns", ()))},
        )

    def resolve_uids(self, table: pa.Table) -> tuple[pa.Table, dict]:
        """The pool's uids from the cached raw values (input.uid), and its source columns:
        ``status``/``error_message``/``exif`` only when some sample has them; the source's
        ``sha256`` beside poolsift's ``image_sha256`` when the source has one, else
        poolsift's hash of the stored bytes is the ``sha256`` column (the stored file is
        then the only file there is, and the bundled sample's tables stay as they were)."""
        cfg = self.uid_cfg
        failed = table.column("error").is_valid().to_numpy(zero_copy_only=False)
        try:
            uid, error, report = resolve_uids(
                table,
                source=getattr(cfg, "source", "json"),
                field=self.uid_field,
                derive=self._derive_from(),
                on_invalid=getattr(cfg, "on_invalid", "error"),
                failed=failed,
            )
        except UidError as e:
            raise ConfigError(
                f"input.uid: {e}; set input.uid.on_invalid to derive (from input.uid.derive: key | url) "
                "or fail, or input.uid.source: derive"
            ) from e
        table = table.set_column(table.column_names.index("uid"), "uid", uid)
        table = table.set_column(table.column_names.index("error"), "error", error)
        for name in OPTIONAL_SOURCE_COLUMNS:
            if name in table.column_names and table.column(name).null_count == table.num_rows:
                table = table.drop_columns([name])
        if table.column("sha256").null_count == table.num_rows:
            own = table.column("image_sha256")
            table = table.drop_columns(["image_sha256"])
            table = table.set_column(table.column_names.index("sha256"), "sha256", own)
        carried = [c for c in table.column_names if c in OPTIONAL_SOURCE_COLUMNS or c not in SCORE_SCHEMA.names]
        if carried:
            report["carried_columns"] = carried
        return table, report

    # --- scoring ---------------------------------------------------------------------

    def score_local(self, urls: list[str], ctx: RunContext) -> None:
        """Score ``urls`` in this process, decoding in worker processes."""
        clip = ctx.clip()
        self.cache.write_info(clip.info)
        encoder = ClipEncoder(clip)
        workers = self.num_workers(clip.device)
        bar = ctx.bar(None, "score")
        try:
            for acc in score_stream(
                urls,
                clip.pil_transform,
                encoder,
                self.model_cfg.batch_size,
                workers,
                bar,
                draft=self.draft_size(clip.pil_transform),
                uid_field=self.uid_field,
            ):
                self.write_shard(acc, encoder.dim)
        finally:
            bar.close()

    def draft_size(self, pil_transform) -> int | None:
        """The size large JPEGs may be DCT-downscaled to while decoding; None when off."""
        from filtering.stages.image_decode import draft_target

        return draft_target(pil_transform) if getattr(self.model_cfg, "jpeg_draft", False) else None

    def num_workers(self, device: str = "cpu") -> int:
        """Decode processes: a GPU wants every other core decoding; on a CPU the model's
        matmuls want the cores (decoding is about a quarter of the work in bf16), so one
        worker per four cores (one on this 2-core machine; README, Performance)."""
        if self.model_cfg.num_workers is not None:
            return self.model_cfg.num_workers
        cores = os.cpu_count() or 2
        return max(1, cores - 1) if device.startswith("cuda") else max(1, cores // 4)

    def field_warnings(self) -> dict[str, int]:
        """Unusable metadata fields left empty, counted per field over every shard."""
        total: Counter = Counter()
        for u in self.urls:
            total.update(self.cache.read_meta(u).get("field_warnings", {}))
        return dict(sorted(total.items()))

    def write_shard(self, acc: _ShardAcc, dim: int) -> None:
        """Cache one shard's rows and embeddings; an img2dataset parquet beside the shard adds
        its columns and one failure row (zero embeddings) per URL it attempted and failed."""
        warnings = Counter(w for row in acc.rows for w in row.pop("_warnings", ()))
        image = np.concatenate(acc.image) if acc.image else np.zeros((0, dim), np.float16)
        text = np.concatenate(acc.text) if acc.text else np.zeros((0, dim), np.float16)
        table = _rows_table(acc.rows, image, text)
        if acc.read is not None and acc.read.error:
            # The rest of a cut-short shard cannot be read: one failure row stands for it.
            table = pa.concat_tables(
                [table, pa.Table.from_pylist([_shard_error_row(acc.url, acc.read.error)], schema=SCORE_SCHEMA)]
            )
            image = np.concatenate([image, np.zeros((1, image.shape[1]), np.float16)])
            text = np.concatenate([text, np.zeros((1, text.shape[1]), np.float16)])
        table, added = merge_side_parquet(table, acc.url, self.uid_field)
        if added:
            image = np.concatenate([image, np.zeros((added, image.shape[1]), np.float16)])
            text = np.concatenate([text, np.zeros((added, text.shape[1]), np.float16)])
        extra = {"field_warnings": dict(sorted(warnings.items()))} if warnings else None
        self.cache.write(acc.url, table, {"image": image, "text": text}, source=source_stamp(acc.url), extra=extra)


_ROW_ERRORS = (pa.ArrowException, ValueError, TypeError, OverflowError, UnicodeError)


def _rows_table(rows: list[dict], image: np.ndarray, text: np.ndarray) -> pa.Table:
    """The shard's rows as a table. A row Arrow cannot store (``_row`` should prevent
    every one) becomes a failure row with zero embeddings rather than failing the shard."""
    try:
        return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)
    except _ROW_ERRORS:
        pass
    for i, row in enumerate(rows):
        try:
            pa.Table.from_pylist([row], schema=SCORE_SCHEMA)
        except _ROW_ERRORS as e:
            rows[i] = {
                "uid": row.get("uid"),
                "key": _safe_text(row.get("key")),
                "source_shard": row.get("source_shard"),
                "caption": "",
                "error": f"bad_row: {type(e).__name__}: {one_line(e)[:160]}",
            }
            image[i] = 0
            text[i] = 0
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


def _safe_text(value) -> str:
    value = value if isinstance(value, str) else str(value)
    return value if _text_ok(value) else value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _shard_error_row(url: str, error: str) -> dict:
    # uid None: the pool derives it from shard name and key, as for every failed row without one
    return {"uid": None, "key": "__shard__", "source_shard": url, "caption": "", "error": error}


def _raw_string(value) -> str | None:
    """A .json value kept as text: strings as they are, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)[:100_000]
    except (TypeError, ValueError, RecursionError):
        return repr(type(value))


def _row(sample: RawSample, url: str, uid_field: str = "uid") -> dict:
    """One sample's cached row. ``uid`` is the .json field as read; the pool's uid is
    resolved from it when the pool is loaded (:func:`filtering.uid.resolve_uids`).
    ``error`` is set when the sample itself is unusable; ``_warnings`` (popped before
    caching) names the .json fields left empty because they cannot be stored."""
    meta, error = sample.read_meta()
    meta = meta or {}
    image = sample.image
    key = sample.key
    if not _text_ok(key):
        key, error = _safe_text(key), error or "bad_name: member name is not UTF-8"
    error = sample.error or error or unsafe_name(key)
    warnings = []
    row = {"uid": _raw_string(meta.get(uid_field)), "key": key, "source_shard": url, "caption": sample.caption}
    for name in ("original_width", "original_height"):
        row[name], bad = _int32(meta.get(name))
        if bad:
            warnings.append(name)
    texts = {name: meta.get(name) if isinstance(meta.get(name), str) else None for name in ("url", "sha256", "status")}
    texts["error_message"] = _raw_string(meta.get("error_message"))
    texts["exif"] = _raw_string(meta.get("exif"))
    for name, value in texts.items():
        if value is not None and not _text_ok(value):
            texts[name] = None
            warnings.append(name)
    row.update(texts)
    row["image_sha256"] = hashlib.sha256(image).hexdigest() if image is not None else None
    row["image_ext"] = sample.image_ext
    if error:
        row["error"] = error
    if warnings:
        row["_warnings"] = warnings
    return row


def decode_input(sample: RawSample) -> bytes | None:
    """The image bytes worth decoding: none for a sample already failed by the reader."""
    return sample.image if sample.error is None else None


def _read_tasks(urls: list[str], chunk: int = DECODE_CHUNK) -> Iterator[tuple]:
    """("chunk", url, samples) for every ``chunk`` samples, then ("end", url, read result)."""
    for url in urls:
        result = ShardReadResult(url)
        samples: list[RawSample] = []
        for sample in iter_shard(url, result):
            samples.append(sample)
            if len(samples) == chunk:
                yield "chunk", url, samples
                samples = []
        if samples:
            yield "chunk", url, samples
        yield "end", url, result


def submit_batch(encoder, items: list[tuple[dict, object]]) -> tuple[list[int], object | None]:
    """Start encoding one model batch of (row, Decoded): its readable images with their
    captions. Returns the readable rows' positions and the pending result (None if none)."""
    ok = [i for i, (row, d) in enumerate(items) if d.error is None and not row.get("error")]
    if not ok:
        return ok, None
    pixels = np.stack([items[i][1].pixels for i in ok])
    captions = [items[i][0]["caption"] for i in ok]
    submit = getattr(encoder, "submit", None)
    return ok, submit(pixels, captions) if submit is not None else _Done(*encoder(pixels, captions))


def complete_batch(items: list[tuple[dict, object]], ok: list[int], pending, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill each row's decode fields and ``clip_score`` (cosine of the unit-norm embeddings);
    return the batch's float16 image and text embeddings, zeros for rows that failed."""
    image = np.zeros((len(items), dim), np.float16)
    text = np.zeros_like(image)
    for row, d in items:  # a failure found before decoding (row["error"]) comes first
        row.update(width=d.width, height=d.height, phash=d.phash, error=row.get("error") or d.error, clip_score=None)
    if pending is not None:
        img, txt = pending.result()
        image[ok], text[ok] = img, txt
        scores = np.einsum("ij,ij->i", img, txt)
        for j, i in enumerate(ok):
            items[i][0]["clip_score"] = float(scores[j])
    return image, text


def encode_batch(encoder, items: list[tuple[dict, object]]) -> tuple[np.ndarray, np.ndarray]:
    """One model batch, encoded and completed at once (the Ray executor's model actors)."""
    ok, pending = submit_batch(encoder, items)
    return complete_batch(items, ok, pending, encoder.dim)


def _worker_died(e: Exception) -> PoolsiftError:
    return PoolsiftError(
        f"a decode worker process died ({type(e).__name__}: {e}); "
        "often the system killed it for memory: lower model.num_workers or model.batch_size"
    )


def score_stream(
    urls,
    pil_transform,
    encoder,
    batch_size: int,
    workers: int,
    bar=None,
    *,
    draft: int | None = None,
    chunk: int = DECODE_CHUNK,
    uid_field: str = "uid",
) -> Iterator[_ShardAcc]:
    """Yield each shard's scored rows and embeddings, in shard order.

    Decoding runs in ``workers`` processes ahead of the model through a bounded window
    of chunks, so memory stays bounded and the model never waits while work is
    queued; ``workers=0`` decodes in this process. A model batch never spans two
    shards, so a shard's result does not depend on which shards were scored with it
    (the Ray executor relies on this). ``draft``: see :mod:`filtering.stages.image_decode`.
    If the encoder (or anything else) raises, pending chunks are cancelled and the
    workers shut down before the exception propagates; a worker that dies becomes a
    :class:`PoolsiftError`.
    """
    import concurrent.futures as cf
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    from filtering import procpool
    from filtering.stages.image_decode import decode_batch, decode_one, init_worker

    executor = None
    if workers > 0:
        executor = cf.ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=init_worker, initargs=(pil_transform, draft)
        )
    window: deque = deque()
    # Enough chunks in flight to keep every worker busy and one model batch ready behind the current one.
    max_pending = 2 * max(workers, 1) + -(-batch_size // chunk)
    batch: list[tuple[dict, object]] = []  # (row, Decoded) waiting for the model
    inflight: deque = deque()  # (acc, batch, ok, pending encode) in submission order
    acc: _ShardAcc | None = None

    def flush() -> None:
        ok, pending = submit_batch(encoder, batch)
        inflight.append((acc, list(batch), ok, pending))
        batch.clear()
        finish(keep=1)  # keep one batch on the device while the next is prepared

    def finish(keep: int) -> None:
        while len(inflight) > keep:
            owner, items, ok, pending = inflight.popleft()
            image, text = complete_batch(items, ok, pending, encoder.dim)
            owner.rows.extend(row for row, _ in items)
            owner.image.append(image)
            owner.text.append(text)
            if bar is not None:
                bar.update(len(items))

    def decoded(fut, samples) -> list:
        if fut is None:
            return [decode_one(decode_input(s), pil_transform, draft) for s in samples]
        try:
            return procpool.result(fut, executor)
        except BrokenProcessPool as e:
            raise _worker_died(e) from e

    def handle(task, fut) -> Iterator[_ShardAcc]:
        nonlocal acc
        kind, url, payload = task
        if acc is None:
            acc = _ShardAcc(url, [], [], [])
        if kind == "chunk":
            for sample, d in zip(payload, decoded(fut, payload), strict=True):
                batch.append((_row(sample, url, uid_field), d))
                if len(batch) >= batch_size:
                    flush()
        else:
            if batch:
                flush()
            finish(keep=0)
            acc.read = payload
            done, acc = acc, None
            yield done

    try:
        for task in _read_tasks(urls, chunk):
            fut = None
            if task[0] == "chunk" and executor is not None:
                try:
                    fut = executor.submit(decode_batch, [decode_input(s) for s in task[2]])
                except BrokenProcessPool as e:
                    raise _worker_died(e) from e
            window.append((task, fut))
            while len(window) > max_pending:
                yield from handle(*window.popleft())
        while window:
            yield from handle(*window.popleft())
    finally:
        if executor is not None:
            # On an error or interrupt: drop queued chunks; running ones finish within a chunk.
            procpool.shutdown(executor)
