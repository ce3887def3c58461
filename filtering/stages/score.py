"""The scoring stage: stream WebDataset shards, decode, CLIP-encode, cache per shard.

For each shard not already cached: samples are read in order, images decoded and
resized by worker processes, then image and text are encoded in batches; the CLIP
score is the cosine similarity of the unit-norm embeddings. Each shard's result — a
table of metadata and scores, plus float16 unit-norm image and text embeddings — is
written atomically; a rerun (or a resumed, killed run) reuses it without loading the
model. Corrupt samples become rows with an ``error`` reason and zero embeddings.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from filtering.cache import ShardCache
from filtering.io.paths import expand_shards, file_info, shard_name
from filtering.io.reader import RawSample, ShardReadResult, iter_shard
from filtering.pool import Pool, ShardPart
from filtering.stages.base import RunContext, SourceStage
from filtering.uid import sample_uid

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
        ("sha256", pa.string()),
        ("phash", pa.uint64()),
        ("image_ext", pa.string()),
        ("clip_score", pa.float32()),
        ("error", pa.string()),
    ]
)
EMBEDDING_KINDS = ("image", "text")
DECODE_CHUNK = 32


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def model_spec(model_cfg) -> dict:
    """What identifies a model's scores: arch, weights (file content for local files), precision."""
    pretrained = model_cfg.pretrained
    weights = pretrained
    if pretrained and os.path.isfile(pretrained):
        h = hashlib.sha256()
        with open(pretrained, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        weights = f"sha256:{h.hexdigest()}"
    return {"arch": model_cfg.arch, "weights": weights, "precision": model_cfg.precision}


@dataclass
class _ShardAcc:
    """Rows of one shard being scored, in read order."""

    url: str
    rows: list[dict]
    image: list[np.ndarray]
    text: list[np.ndarray]
    read: ShardReadResult | None = None


def encode_text_trimmed(model, tokens):
    """Encode text trimmed to the batch's longest real token sequence.

    Exact for open_clip's causal text tower: the causal mask means positions after a
    sequence's end-of-text token never influence it, so dropping trailing padding
    columns changes nothing (checked against the padded result in tests). Other text
    towers fall back to the model's own ``encode_text``.
    """
    import torch
    import torch.nn.functional as F
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    if not isinstance(model, CLIP) or model.text_pool_type != "argmax" or model.attn_mask is None:
        return model.encode_text(tokens, normalize=True)
    length = int((tokens != 0).sum(dim=1).max().item())
    length = max(1, min(length, tokens.shape[1]))
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type)
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1)


class ClipEncoder:
    """Batched image and text encoding with the model's own normalization, on its device."""

    def __init__(self, clip):
        self.clip = clip
        self.dim = int(self._encode_text([""]).shape[1])

    def _encode_text(self, captions: list[str]):
        import torch

        with torch.inference_mode():
            tokens = self.clip.tokenizer(captions).to(self.clip.device)
            return encode_text_trimmed(self.clip.model, tokens).float()

    def __call__(self, pixels: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch
        import torch.nn.functional as F

        clip = self.clip
        device = torch.device(clip.device)
        dtype = clip.autocast_dtype
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            x = torch.from_numpy(pixels)
            if device.type == "cuda":
                x = x.pin_memory().to(device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = clip.tensor_transform(x)
            img = F.normalize(clip.model.encode_image(x).float(), dim=-1)
            tokens = clip.tokenizer(captions).to(device)
            txt = encode_text_trimmed(clip.model, tokens).float()
            txt = F.normalize(txt, dim=-1)
        return img.cpu().numpy(), txt.cpu().numpy()


class ScoreStage(SourceStage):
    """Source stage for ``input.shards``: builds the pool from the per-shard score cache."""

    name = "score"

    def __init__(self, shards_spec, model_cfg, cache_root: str):
        self.shards_spec = shards_spec
        self.model_cfg = model_cfg
        self.urls = expand_shards(shards_spec)
        self.cache = ShardCache(cache_root, "score", model_spec(model_cfg))

    def provides(self) -> set[str]:
        return set(SCORE_SCHEMA.names)

    def run(self, ctx: RunContext) -> Pool:
        sources = {u: file_info(u) for u in self.urls}
        todo = [u for u in self.urls if not self.cache.is_done(u, sources[u])]
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
        return self.load_pool()

    def load_pool(self) -> Pool:
        tables, parts, start = [], [], 0
        for u in self.urls:
            t = self.cache.read_table(u)
            tables.append(t)
            parts.append(ShardPart(u, self.cache.table_path(u), start, start + t.num_rows))
            start += t.num_rows
        table = pa.concat_tables(tables) if tables else SCORE_SCHEMA.empty_table()
        return Pool(
            table=table,
            parts=parts,
            embedding_loader=lambda kind, part: self.cache.read_array(part.url, kind),
            embedding_kinds=EMBEDDING_KINDS,
            default_embedding="image",
        )

    # --- scoring ---------------------------------------------------------------------

    def score_local(self, urls: list[str], ctx: RunContext) -> None:
        """Score ``urls`` in this process, decoding in worker processes."""
        clip = ctx.clip()
        self.cache.write_info(clip.info)
        encoder = ClipEncoder(clip)
        workers = self.num_workers()
        bar = ctx.bar(None, "score")
        try:
            for acc in score_stream(urls, clip.pil_transform, encoder, self.model_cfg.batch_size, workers, bar):
                self.write_shard(acc, encoder.dim)
        finally:
            bar.close()

    def num_workers(self) -> int:
        if self.model_cfg.num_workers is not None:
            return self.model_cfg.num_workers
        return max(1, min(8, (os.cpu_count() or 2) - 1))

    def write_shard(self, acc: _ShardAcc, dim: int) -> None:
        table = pa.Table.from_pylist(acc.rows, schema=SCORE_SCHEMA)
        image = np.concatenate(acc.image) if acc.image else np.zeros((0, dim), np.float16)
        text = np.concatenate(acc.text) if acc.text else np.zeros((0, dim), np.float16)
        if acc.read is not None and acc.read.error:
            # The rest of a cut-short shard cannot be read: one failure row stands for it.
            table = pa.concat_tables([table, pa.Table.from_pylist([_shard_error_row(acc.url, acc.read.error)], schema=SCORE_SCHEMA)])
            image = np.concatenate([image, np.zeros((1, image.shape[1]), np.float16)])
            text = np.concatenate([text, np.zeros((1, text.shape[1]), np.float16)])
        self.cache.write(acc.url, table, {"image": image, "text": text})


def _shard_error_row(url: str, error: str) -> dict:
    name = shard_name(url)
    return {"uid": sample_uid(None, name, "__shard__"), "key": "__shard__", "source_shard": url, "caption": "", "error": error}


def _row(sample: RawSample, url: str) -> dict:
    meta = sample.meta or {}
    image = sample.image
    return {
        "uid": sample_uid(meta, shard_name(url), sample.key),
        "key": sample.key,
        "source_shard": url,
        "caption": sample.caption,
        "url": meta.get("url") if isinstance(meta.get("url"), str) else None,
        "original_width": _int_or_none(meta.get("original_width")),
        "original_height": _int_or_none(meta.get("original_height")),
        "sha256": hashlib.sha256(image).hexdigest() if image is not None else None,
        "image_ext": sample.image_ext,
    }


def _read_tasks(urls: list[str]) -> Iterator[tuple]:
    """("chunk", url, samples) for every DECODE_CHUNK samples, then ("end", url, read result)."""
    for url in urls:
        result = ShardReadResult(url)
        chunk: list[RawSample] = []
        for sample in iter_shard(url, result):
            chunk.append(sample)
            if len(chunk) == DECODE_CHUNK:
                yield "chunk", url, chunk
                chunk = []
        if chunk:
            yield "chunk", url, chunk
        yield "end", url, result


def score_stream(urls, pil_transform, encoder, batch_size: int, workers: int, bar=None) -> Iterator[_ShardAcc]:
    """Yield each shard's scored rows and embeddings, in shard order.

    Decoding runs in ``workers`` processes ahead of the model through a bounded window
    of chunks, so memory stays bounded; ``workers=0`` decodes in this process.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    from filtering.scorers.decode import decode_batch, decode_one, init_worker

    executor = None
    if workers > 0:
        executor = cf.ProcessPoolExecutor(
            workers, mp_context=mp.get_context("spawn"), initializer=init_worker, initargs=(pil_transform,)
        )
    window: deque = deque()
    max_pending = 4 * max(workers, 1) + batch_size // DECODE_CHUNK
    batch: list[tuple[dict, object]] = []  # (row, Decoded) waiting for the model
    acc: _ShardAcc | None = None

    def flush() -> None:
        ok = [i for i, (_, d) in enumerate(batch) if d.error is None]
        image = np.zeros((len(batch), encoder.dim), np.float16)
        text = np.zeros_like(image)
        if ok:
            img, txt = encoder(np.stack([batch[i][1].pixels for i in ok]), [batch[i][0]["caption"] for i in ok])
            image[ok], text[ok] = img, txt
            scores = np.einsum("ij,ij->i", img, txt)
        for row, d in batch:
            row.update(width=d.width, height=d.height, phash=d.phash, error=d.error, clip_score=None)
        for j, i in enumerate(ok):
            batch[i][0]["clip_score"] = float(scores[j])
        acc.rows.extend(row for row, _ in batch)
        acc.image.append(image)
        acc.text.append(text)
        if bar is not None:
            bar.update(len(batch))
        batch.clear()

    def handle(task, fut) -> Iterator[_ShardAcc]:
        nonlocal acc
        kind, url, payload = task
        if acc is None:
            acc = _ShardAcc(url, [], [], [])
        if kind == "chunk":
            decoded = fut.result() if fut is not None else [decode_one(s.image, pil_transform) for s in payload]
            for sample, d in zip(payload, decoded, strict=True):
                batch.append((_row(sample, url), d))
                if len(batch) >= batch_size:
                    flush()
        else:
            if batch:
                flush()
            acc.read = payload
            done, acc = acc, None
            yield done

    try:
        for task in _read_tasks(urls):
            fut = None
            if task[0] == "chunk" and executor is not None:
                fut = executor.submit(decode_batch, [s.image for s in task[2]])
            window.append((task, fut))
            while len(window) > max_pending:
                yield from handle(*window.popleft())
        while window:
            yield from handle(*window.popleft())
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
