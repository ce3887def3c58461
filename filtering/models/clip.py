"""Loading CLIP models through open_clip, for real weights and the bundled tiny model alike.

``pretrained`` may be an open_clip tag (``openai``, ``laion2b_s34b_b79k``), ``hf-hub:org/name``
or a local checkpoint file (``.safetensors``, or a ``.pt``/``.bin`` state dict loaded with
``weights_only=True``: no arbitrary unpickling). Architectures are open_clip's own or JSON
configs registered with :func:`open_clip.add_model_config`: those bundled in
``filtering/models/configs/`` always, and any ``arch: path/to/name.json``.

open_clip's inference transform is split in two so that decode workers can run the
PIL part (resize, crop, RGB) on uint8 images and the model process runs the tensor part
(scale to [0, 1], normalize) on the device; the composition is the model's own transform.

open_clip's ``SimpleTokenizer`` encodes a whole caption before cutting it to the context
(a 10 MB caption took 34 s); :class:`BoundedTokenizer` stops at the tokens the context
can hold, with the same tokens.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filtering.errors import ConfigError, PoolsiftError

BUNDLED_CONFIG_DIR = Path(__file__).parent / "configs"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@functools.cache
def register_bundled_configs() -> None:
    import open_clip

    open_clip.add_model_config(BUNDLED_CONFIG_DIR)


def resolve_arch(arch: str) -> str:
    """Register ``arch`` if it is a JSON config file and return the open_clip model name."""
    register_bundled_configs()
    if arch.endswith(".json"):
        import open_clip

        path = Path(arch)
        if not path.is_file():
            raise ConfigError(f"model.arch: config file {arch!r} not found")
        open_clip.add_model_config(path)
        return path.stem
    return arch


def resolve_device(device: str) -> str:
    """``auto`` is the first CUDA device when one is usable, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {device!r} requested but no CUDA device is available")
    return device


def cpu_supports_bf16() -> bool:
    """bf16 matmuls are only fast on CPUs with native bf16 (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_key(precision: str, device: str) -> str:
    """What ``precision`` resolves to on this machine, worked out without importing torch:
    score caches are keyed by it, so scores made in bf16 on one machine are never taken
    for fp32 scores on another. Where a GPU may be used, the exact choice depends on the
    GPU and the key is ``auto/cuda``."""
    if precision != "auto":
        return precision
    if device == "cpu" or (device == "auto" and not _nvidia_gpu_visible()):
        return resolve_precision(precision, "cpu")
    return "auto/cuda"


def _nvidia_gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or os.path.isdir("/proc/driver/nvidia/gpus")


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: on a CUDA device, bf16 where it has native bf16 (compute capability 8.0,
    Ampere, and later), else fp16; on a CPU, bf16 with native bf16 (AVX512-BF16 or AMX),
    else fp32. The reduced precisions run as autocast over fp32 weights; only fp32 gives
    open_clip's own scores.

    ``torch.cuda.is_bf16_supported()`` is not asked: it counts emulated bf16 (slow, on a
    T4 or V100) as support, and answers for the current device, not ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision: {precision!r} is not one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return "bf16" if major >= 8 else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def checkpoint_file(arch: str, pretrained: str | None) -> str | None:
    """The local file holding the weights: the path itself, or open_clip's cached download."""
    if not pretrained:
        return None
    if pretrained.startswith("hf-hub:"):
        from open_clip.pretrained import download_pretrained_from_hf

        return download_pretrained_from_hf(pretrained.removeprefix("hf-hub:"))
    if os.path.isfile(pretrained):
        return pretrained
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, pretrained)
    return download_pretrained(cfg) if cfg else None


_REFUSED = re.compile(r"GLOBAL ([\w.]+)")  # "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y whose ..."


def checkpoint_error(model_name: str, tag: str | None, e: BaseException) -> str:
    """Why a checkpoint did not load, as one line naming it.

    torch's refusal of a pickle that holds code is several paragraphs ending in a docs
    URL and advice to pass ``weights_only=False``; that advice is never passed on: a
    checkpoint that needs it can run code on load.
    """
    where = f"model.pretrained: {tag}" if tag and os.path.isfile(tag) else f"model {model_name!r} (pretrained={tag!r})"
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = _REFUSED.search(text)
        what = f"a reference to {found.group(1)}" if found else "objects other than tensors and plain values"
        return (
            f"{where}: refused: the checkpoint is a pickle holding {what}; only tensors and plain values load "
            "safely (convert it to .safetensors)"
        )
    if isinstance(e, EOFError) or (tag and os.path.isfile(tag) and os.path.getsize(tag) == 0):
        return f"{where}: the file is empty or cut short"
    cause = " ".join(text.replace("Error(s) in loading state_dict for", "state dict for").split())
    cause = cause or type(e).__name__
    if len(cause) > 300:
        cause = cause[:297] + "..."
    return f"{where}: cannot load: {cause}"


@dataclass
class ClipModel:
    """A loaded CLIP model with its tokenizer and split preprocessing."""

    model: Any
    tokenizer: Any
    pil_transform: Any  # picklable callable: PIL image -> PIL image (resize, crop, RGB)
    tensor_transform: Any  # callable on a float [0,1] NCHW batch (normalize)
    device: str
    precision: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def autocast_dtype(self):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)


class BoundedTokenizer:
    """open_clip's ``SimpleTokenizer``, encoding a caption only as far as the context holds.

    open_clip returns ``[sot] + encode(text) + [eot]`` cut to ``context_length`` (last
    token set to eot): only the first ``context_length - 2`` BPE tokens are used once
    there are ``context_length - 1``. Words are encoded in order, the tokenizer's own
    way, until there are that many, so the result is open_clip's own (tests compare).
    Two bounds come first, each far beyond what a caption that fits the context needs:

    - ``max_chars`` (65,536): the caption is cut to that many characters before the
      cleaning (ftfy, HTML entities, whitespace), which is linear but slow on non-ASCII
      text (1.3 s per MB). The context holds at most 76 x 32 characters' worth of BPE
      tokens (2,432 with the 77-token context), so only a caption that is 96% whitespace,
      control characters or entities could fit the context and be changed by the cut;
    - ``max_word``: a single word that alone fills the context (more characters than
      ``context_length - 1`` times the longest token) is cut to that, as BPE is
      quadratic in a word's length; only a caption that does not fit holds one.
    """

    max_chars = 65_536

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length
        longest = max(len(t) for t in tokenizer.encoder)  # characters per BPE token, at most
        self.max_word = (self.context_length - 1) * longest

    def __getattr__(self, name: str):
        if name == "tokenizer":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """BPE token ids of ``text``, stopping once there are ``limit``."""
        tok = self.tokenizer
        out: list[int] = []
        for m in tok.pat.finditer(tok.clean_fn(text[: self.max_chars])):
            word = m.group()[: self.max_word]
            symbols = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
            out.extend(tok.encoder[t] for t in tok.bpe(symbols).split(" "))
            if limit is not None and len(out) >= limit:
                break
        return out

    def __call__(self, texts: str | list[str], context_length: int | None = None):
        import torch

        texts = [texts] if isinstance(texts, str) else texts
        n = context_length or self.context_length
        tok = self.tokenizer
        result = torch.zeros(len(texts), n, dtype=torch.long)
        for i, text in enumerate(texts):
            tokens = [tok.sot_token_id, *self.encode(text, n - 1), tok.eot_token_id]
            if len(tokens) > n:
                tokens = tokens[:n]
                tokens[-1] = tok.eot_token_id
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result


def bounded_tokenizer(tokenizer):
    """``tokenizer`` wrapped in :class:`BoundedTokenizer` when it is open_clip's plain BPE
    tokenizer; others (Hugging Face tokenizers, which cut in Rust, or ones with a
    reduction strategy) are returned as they are."""
    from open_clip.tokenizer import SimpleTokenizer

    if type(tokenizer) is SimpleTokenizer and getattr(tokenizer, "reduction_fn", None) is None:
        return BoundedTokenizer(tokenizer)
    return tokenizer


def split_transform(preprocess) -> tuple[Any, Any]:
    """Split an open_clip ``Compose`` at its to-tensor step into a PIL part and a tensor part."""
    from torchvision.transforms import Compose

    from filtering.models.transforms import pil_only

    steps = list(getattr(preprocess, "transforms", [preprocess]))
    for i, step in enumerate(steps):
        if type(step).__name__ in ("ToTensor", "MaybeToTensor"):
            # The PIL part runs in decode workers: in plain PIL where it can, so they need no torch.
            return pil_only(Compose(steps[:i])), Compose(steps[i + 1 :])
    raise PoolsiftError(f"cannot split the model's image transform {preprocess!r}: no ToTensor step")


def load_clip(
    arch: str,
    pretrained: str | None,
    device: str = "auto",
    precision: str = "auto",
) -> ClipModel:
    """Build an open_clip model and its transforms; weights loaded safely (``weights_only``)."""
    import open_clip
    import torch

    name = resolve_arch(arch)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    if pretrained and pretrained.startswith("hf-hub:"):
        model_name, tag = pretrained, None
    else:
        model_name, tag = name, pretrained
        if name not in open_clip.list_models():
            raise ConfigError(f"model.arch: unknown architecture {name!r}. Available: {open_clip.list_models()}")
        if tag and not os.path.isfile(tag) and tag not in open_clip.list_pretrained_tags_by_model(name):
            raise ConfigError(
                f"model.pretrained: {tag!r} is neither a local file nor a known tag for {name}. "
                f"Known tags: {open_clip.list_pretrained_tags_by_model(name)}"
            )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, device=device, weights_only=True
        )
    except Exception as e:  # noqa: BLE001 — torch, safetensors and zip raise many types; all become one line
        if isinstance(e, PoolsiftError):
            raise
        raise PoolsiftError(checkpoint_error(model_name, tag, e)) from e
    model.eval()
    tokenizer = bounded_tokenizer(open_clip.get_tokenizer(model_name))
    pil_transform, tensor_transform = split_transform(preprocess)
    ckpt = checkpoint_file(name, pretrained)
    info = {
        "arch": name,
        "pretrained": pretrained,
        "checkpoint_sha256": _sha256(ckpt) if ckpt else None,
        "precision": precision,
        "device": device,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    return ClipModel(model, tokenizer, pil_transform, tensor_transform, device, precision, info)
