"""CLIP scoring as a scorer: cosine similarity of the image and caption embeddings.

The WebDataset source runs it on every readable sample, from ``model:`` (arch,
weights, precision, device); its cache (``scorer-clip-<fp>/``) holds ``clip_score``
and the unit-norm float16 ``image`` and ``text`` embeddings, keyed by the model's
arch, weights digest and precision (:func:`model_spec`).

Fast paths, all exact or measured (docs/architecture.md, "The scoring stage's fast paths"): images arrive as uint8 NHWC
pixels from the decode workers (the model's own PIL transform, :mod:`filtering.models.clip`),
normalization runs on the device; captions are encoded trimmed to the batch's longest
token sequence (bucketed by length on the CPU); ``bf16``/``fp16`` run as autocast over
fp32 weights; on CUDA, :meth:`ClipEncoder.submit` stages batches in pinned memory and
copies on a side stream, so the next batch's copy overlaps this one's forward pass.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, ClassVar

import numpy as np

from filtering.scorers.base import Batch, Needs, Scorer, ScorerParams, register


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


class ClipParams(ScorerParams):
    arch: str = "ViT-B-32"
    pretrained: str | None = "openai"
    device: str = "auto"
    precision: str = "auto"

    path_fields: ClassVar[tuple[str, ...]] = ("pretrained",)  # a local checkpoint: resolved against the config's folder


class _Result:
    """An encoder result turned into the scorer's named arrays when asked for."""

    def __init__(self, pending):
        self.pending = pending

    def result(self) -> dict[str, np.ndarray]:
        image, text = self.pending.result()
        return {"clip_score": np.einsum("ij,ij->i", image, text), "image": image, "text": text}


@register
class ClipScorer(Scorer):
    """``clip_score`` and the ``image``/``text`` embeddings of one open_clip model."""

    kind: ClassVar[str] = "clip"
    Params = ClipParams

    @classmethod
    def from_model_config(cls, model_cfg, input_info, path: str = "model") -> ClipScorer:
        """The run's CLIP scorer, from the ``model:`` section."""
        params = ClipParams(
            arch=model_cfg.arch,
            pretrained=model_cfg.pretrained,
            device=getattr(model_cfg, "device", "auto"),
            precision=model_cfg.precision,
        )
        return cls(params, input_info, path)

    def provides(self) -> tuple[str, ...]:
        return ("clip_score",)

    def embeddings(self) -> tuple[str, ...]:
        return ("image", "text")

    def needs(self) -> Needs:
        return Needs(pixels=True, captions=True)

    def fingerprint(self) -> dict[str, Any]:
        return model_spec(self.params)

    @property
    def device(self) -> str:
        return self.params.device

    def placed(self, device: str) -> ClipScorer:
        return type(self)(self.params.model_copy(update={"device": device}), self.input, self.path)

    def attach(self, clip) -> None:
        """Use a model already loaded in this process (the run context's) instead of loading one."""
        self._model_clip = clip
        self._model_encoder = ClipEncoder(clip)
        self._ready = True

    def setup(self) -> None:
        from filtering.models.clip import load_clip

        p = self.params
        self.attach(load_clip(p.arch, p.pretrained, p.device, p.precision))

    @property
    def clip(self):
        self.ensure_setup()
        return self._model_clip

    @property
    def encoder(self) -> ClipEncoder:
        self.ensure_setup()
        return self._model_encoder

    def transform(self):
        """The model's PIL preprocessing; without a loaded model, from a CPU copy."""
        if getattr(self, "_model_clip", None) is not None:
            return self._model_clip.pil_transform
        from filtering.models.clip import load_clip

        p = self.params
        return load_clip(p.arch, p.pretrained, "cpu", p.precision if p.precision != "auto" else "fp32").pil_transform

    def info(self) -> dict[str, Any]:
        return dict(self.clip.info)

    def embedding_dims(self) -> dict[str, int]:
        return {"image": self.encoder.dim, "text": self.encoder.dim}

    def submit(self, batch: Batch):
        """On CUDA the batch's copy and forward pass are queued; ``result()`` waits for them."""
        return _Result(self.encoder.submit(batch.pixels, list(batch.columns["caption"])))

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        return _Result(self.encoder.submit(batch.pixels, list(batch.columns["caption"]))).result()
