"""``embedding_head``: a linear or MLP head over an embedding kind, as LAION-5B and NeMo Curator score images.

The head reads one embedding kind (DataComp's ``l14_img`` / ``b32_img`` npz arrays, or
the run's own CLIP ``image`` embeddings for WebDataset input) and writes one column,
``<name>_score``. Weights come from the file the user names: safetensors (read with
``safetensors.numpy``, no torch) or a weights-only torch state dict (``.pt``/``.pth``,
``torch.load(weights_only=True)``). Presets fix the architecture and the input
normalisation of the public heads:

``laion_aesthetic``
    LAION's improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor,
    ``simple_inference.py``): ``nn.Sequential`` of Linear 768->1024, Dropout, 1024->128,
    Dropout, 128->64, Dropout, 64->16, 16->1, no activations (commented out upstream),
    state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``, over L2-normalised ViT-L/14
    image embeddings; the output is the predicted 1-10 rating.
``nemo_nsfw``
    LAION's CLIP-based NSFW detector as NeMo Curator ports it to PyTorch
    (``NSFWModel``): ``norm`` ((x - mean) / sqrt(variance), buffers ``norm.mean``,
    ``norm.variance``), then ``linear_1`` 768->64, ``linear_2`` 64->512, ``linear_3``
    512->256 with ReLU, ``linear_4`` 256->1 and a sigmoid: the NSFW probability. Its
    input is NeMo Curator's L2-normalised ViT-L/14 image embedding.
``linear`` / ``mlp``
    Any stack of ``Linear`` layers: every 2-d ``*weight`` (and its ``bias``) in natural
    key order (``layers.2`` before ``layers.10``); ``activation`` between layers
    (``mlp``: relu by default; ``linear``: one layer), ``output`` identity or sigmoid,
    ``normalize`` the input to unit length (default true).

Dropout is the identity at inference, so the presets list only the Linear layers. In
numpy, consecutive Linear layers with no activation between them are multiplied out
once (in float64) into one affine map: the aesthetic head becomes one 768-vector dot
product per row, the same function at a fraction of the cost (``bench/bench_heads.py``).
The torch backend runs the layers as the public code does.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from filtering.errors import ConfigError, InputError
from filtering.scorers.base import Batch, Needs, Scorer, ScorerParams, register
from filtering.sources import source_info

PRESETS = ("laion_aesthetic", "nemo_nsfw", "linear", "mlp")
_AESTHETIC_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
_NSFW_LAYERS = ("linear_1", "linear_2", "linear_3", "linear_4")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EmbeddingHeadParams(ScorerParams):
    path_fields: ClassVar[tuple[str, ...]] = ("weights",)  # resolved against the config's folder
    name: str  # the column is <name>_score unless ``column`` says otherwise
    preset: str
    weights: str
    embedding: str | None = None  # None: the pool's default (CLIP image; l14_img for DataComp)
    column: str | None = None
    backend: Literal["numpy", "torch"] = "numpy"
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")  # torch backend only
    activation: Literal["relu", "gelu", "none"] | None = None  # linear / mlp only
    output: Literal["identity", "sigmoid"] | None = None  # linear / mlp only
    normalize: bool | None = None  # L2-normalise the input; linear / mlp only (presets fix it)

    @field_validator("name", "column")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError("must be a name of letters, digits and underscores")
        return value

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; valid presets: {', '.join(PRESETS)}")
        return value


@dataclass
class Layer:
    weight: np.ndarray  # (out, in)
    bias: np.ndarray | None  # (out,)
    activation: str  # applied after this layer: relu | gelu | sigmoid | none


@dataclass
class Head:
    """A head as data: input normalisation, then Linear layers with activations."""

    normalize: bool
    mean: np.ndarray | None
    variance: np.ndarray | None
    layers: list[Layer]

    @property
    def in_dim(self) -> int:
        return int(self.layers[0].weight.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.layers[-1].weight.shape[0])


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors by name from safetensors (no torch) or a weights-only torch state dict."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"weights file {path!r} not found")
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return {k: np.asarray(v) for k, v in load_file(str(p)).items()}
        except (OSError, ValueError, TypeError) as e:  # bf16 tensors have no numpy dtype
            raise InputError(f"{path}: not a readable safetensors file of float tensors: {e}") from e
    import pickle

    import torch

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise InputError(f"{path}: not a weights-only torch state dict ({e.__class__.__name__}: {e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: expected a state dict (names to tensors), got {type(obj).__name__}")
    return {k: v.detach().float().numpy() for k, v in obj.items()}


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _linear(sd: dict[str, np.ndarray], prefix: str, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    wkey = f"{prefix}.weight" if prefix else "weight"
    if wkey not in sd:
        raise ConfigError(f"{path}: no tensor {wkey!r} in the weights (it has {sorted(sd)})")
    w = np.asarray(sd[wkey], dtype=np.float32)
    if w.ndim != 2:
        raise ConfigError(f"{path}: {wkey!r} has shape {list(w.shape)}, expected a 2-d Linear weight")
    b = sd.get(f"{prefix}.bias" if prefix else "bias")
    return w, None if b is None else np.asarray(b, dtype=np.float32).reshape(-1)


def build_head(
    sd: dict[str, np.ndarray],
    preset: str,
    *,
    activation: str | None = None,
    output: str | None = None,
    normalize: bool | None = None,
    path: str = "weights",
) -> Head:
    """The preset's architecture over the state dict ``sd``; raises ``ConfigError`` naming what is off."""
    fixed = preset in ("laion_aesthetic", "nemo_nsfw")
    if fixed and (activation, output, normalize) != (None, None, None):
        raise ConfigError(f"{path}: the {preset} preset fixes activation, output and normalize; remove them")
    mean = variance = None
    if preset == "laion_aesthetic":
        prefixes, acts, out_act, l2 = _AESTHETIC_LAYERS, ["none"] * 4, "none", True
    elif preset == "nemo_nsfw":
        prefixes, acts, out_act, l2 = _NSFW_LAYERS, ["relu"] * 3, "sigmoid", True
        for k in ("norm.mean", "norm.variance"):
            if k not in sd:
                raise ConfigError(f"{path}: no tensor {k!r} in the weights (it has {sorted(sd)})")
        mean = np.asarray(sd["norm.mean"], np.float32).reshape(-1)
        variance = np.asarray(sd["norm.variance"], np.float32).reshape(-1)
    else:
        prefixes = tuple(
            sorted(
                (
                    k.removesuffix("weight").removesuffix(".")
                    for k, v in sd.items()
                    if k.endswith("weight") and np.ndim(v) == 2
                ),
                key=_natural,
            )
        )
        if not prefixes:
            raise ConfigError(f"{path}: no 2-d Linear weights in the file (it has {sorted(sd)})")
        if preset == "linear" and len(prefixes) != 1:
            raise ConfigError(
                f"{path}: the linear preset takes one Linear layer, the file has {len(prefixes)}: "
                f"{list(prefixes)}; use preset: mlp"
            )
        act = activation or ("relu" if preset == "mlp" else "none")
        acts, out_act = [act] * (len(prefixes) - 1), {"sigmoid": "sigmoid"}.get(output or "identity", "none")
        l2 = True if normalize is None else normalize
    expected = {f"{p}.{s}" if p else s for p in prefixes for s in ("weight", "bias")}
    if fixed:
        expected |= {"norm.mean", "norm.variance"} if preset == "nemo_nsfw" else set()
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or extra:
            raise ConfigError(
                f"{path}: not a {preset} state dict: "
                + "; ".join(([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else []))
            )
    layers = []
    for prefix, act in zip(prefixes, [*acts, out_act], strict=True):
        w, b = _linear(sd, prefix, path)
        if layers and layers[-1].weight.shape[0] != w.shape[1]:
            raise ConfigError(
                f"{path}: layer {prefix!r} takes {w.shape[1]} inputs but the layer before gives "
                f"{layers[-1].weight.shape[0]}"
            )
        if b is not None and b.shape != (w.shape[0],):
            raise ConfigError(f"{path}: {prefix}.bias has {b.shape[0]} values for {w.shape[0]} outputs")
        layers.append(Layer(w, b, act))
    head = Head(l2, mean, variance, layers)
    if head.out_dim != 1:
        raise ConfigError(f"{path}: the head has {head.out_dim} outputs; a score head has one")
    if mean is not None and (mean.shape != (head.in_dim,) or variance.shape != (head.in_dim,)):
        raise ConfigError(f"{path}: norm.mean/norm.variance do not match the head's {head.in_dim} inputs")
    return head


def fold(head: Head) -> list[Layer]:
    """Multiply out runs of Linear layers with no activation between them (in float64)."""
    out: list[Layer] = []
    w = b = None
    for layer in head.layers:
        lw = layer.weight.astype(np.float64)
        lb = np.zeros(lw.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
        if w is None:
            w, b = lw, lb
        else:
            w, b = lw @ w, lw @ b + lb
        if layer.activation != "none":
            out.append(Layer(w.astype(np.float32), b.astype(np.float32), layer.activation))
            w = b = None
    if w is not None:
        out.append(Layer(w.astype(np.float32), b.astype(np.float32), "none"))
    return out


def _act_numpy(x: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(x, 0, out=x)
    if act == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if act == "gelu":  # exact (erf) GELU, torch.nn.GELU's default
        from scipy.special import erf

        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    return x


def forward_numpy(head: Head, x: np.ndarray, layers: list[Layer] | None = None) -> np.ndarray:
    """Scores of the rows of ``x`` (float32), one per row."""
    x = np.asarray(x, dtype=np.float32)
    layers = layers if layers is not None else head.layers
    scale = None
    if head.normalize:
        norm = np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)
        if head.mean is None:  # (x / |x|) @ W.T == (x @ W.T) / |x|: no normalised copy of the input
            scale = 1.0 / norm
        else:
            x = x / norm[:, None]
    if head.mean is not None:
        x = (x - head.mean) / np.sqrt(head.variance)
    for layer in layers:
        x = x @ layer.weight.T
        if scale is not None:
            x *= scale[:, None]
            scale = None
        if layer.bias is not None:
            x += layer.bias
        x = _act_numpy(x, layer.activation)
    return x[:, 0].astype(np.float32)


class TorchHead:
    """The same head as torch modules' functional calls, layer by layer, on ``device``."""

    def __init__(self, head: Head, device: str):
        import torch

        self.device = torch.device(device)
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        self.head = head
        self.mean, self.variance = t(head.mean), t(head.variance)
        self.layers = [(t(layer.weight), t(layer.bias), layer.activation) for layer in head.layers]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F  # noqa: N812

        acts = {"relu": F.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "none": lambda v: v}
        with torch.inference_mode():
            y = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            if self.head.normalize:
                y = F.normalize(y, dim=-1)
            if self.mean is not None:
                y = (y - self.mean) / self.variance.sqrt()
            for w, b, act in self.layers:
                y = acts[act](F.linear(y, w, b))
            return y[:, 0].float().cpu().numpy()


@register
class EmbeddingHead(Scorer):
    kind = "embedding_head"
    Params = EmbeddingHeadParams

    @property
    def column(self) -> str:
        return self.params.column or f"{self.params.name}_score"

    def provides(self) -> tuple[str, ...]:
        return (self.column,)

    def needs(self) -> Needs:
        return Needs(embedding=True, embedding_kind=self.params.embedding)

    def embedding_kind(self) -> str | None:
        if self.params.embedding:
            return self.params.embedding
        return source_info(self.input.kind).default_embedding

    def fingerprint(self) -> dict[str, Any]:
        return {**self.params.model_dump(mode="json", exclude={"name", "device"}), "weights": self.weights_sha256()}

    def weights_sha256(self) -> str:
        if getattr(self, "_weights_digest", None) is None:
            try:
                h = hashlib.sha256()
                with open(self.params.weights, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                self._weights_digest = h.hexdigest()
            except FileNotFoundError as e:
                raise InputError(f"{self.path}.weights: {self.params.weights!r} not found") from e
        return self._weights_digest

    def load_head(self) -> Head:
        p = self.params
        try:
            sd = load_state_dict(p.weights)
        except InputError as e:
            raise InputError(f"{self.path}.weights: {e}") from e
        return build_head(
            sd, p.preset, activation=p.activation, output=p.output, normalize=p.normalize, path=f"{self.path}.weights"
        )

    def check(self) -> None:
        """The weights load and fit the preset; their input size fits the embedding kind where known."""
        kind = self.embedding_kind()
        if self.input.kind == "webdataset" and kind not in ("image", "text"):
            raise ConfigError(
                f"{self.path}.embedding: WebDataset input has the run's CLIP embeddings 'image' and "
                f"'text', not {kind!r} (DataComp's npz arrays need input.datacomp_metadata)"
            )
        head = self.load_head()
        dim = self.input.embedding_dims.get(kind)
        if dim is not None:
            self.check_dim(head, kind, dim)

    def check_dim(self, head: Head, kind: str, dim: int) -> None:
        if head.in_dim != dim:
            raise ConfigError(
                f"{self.path}: the {self.params.preset} head in {self.params.weights!r} takes {head.in_dim}-dimensional "
                f"embeddings, but embedding {kind!r} has {dim} dimensions; choose an embedding of {head.in_dim}"
            )

    def setup(self) -> None:
        self._model_head = self.load_head()
        if self.params.backend == "torch":
            self._model_run = TorchHead(self._model_head, self.params.device)
        else:
            layers = fold(self._model_head)
            self._model_run = lambda x: forward_numpy(self._model_head, x, layers)

    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        emb = batch.embeddings
        self.check_dim(self._model_head, self.params.embedding or self.embedding_kind(), emb.shape[1])
        return {self.column: self._model_run(emb)}
