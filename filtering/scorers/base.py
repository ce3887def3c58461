"""Scorers: one step writes a score column, a filter thresholds it (NeMo Curator's Score/Filter split).

A scorer is one file: a :class:`Scorer` subclass with a ``kind`` (its name in YAML's
``scorers:`` list), a pydantic ``Params`` model (unknown keys rejected), and

- :meth:`Scorer.provides`: the columns it adds (``aesthetic_score``...);
- :meth:`Scorer.needs`: what it reads: an embedding kind, pool columns, captions,
  decoded images (``images``: scored where the image is decoded, in the source's decode
  workers) or the output of its own :meth:`Scorer.transform` (``pixels``: batched, in the
  process or Ray actor that holds its model); checked by the planner before any data is read;
- :meth:`Scorer.fingerprint`: everything besides its input that changes its result
  (weights digest, preset, version); its cache lives under its own fingerprint, so
  adding or changing one scorer never invalidates another's cache;
- :meth:`Scorer.check`: plan-time checks that need no data (files exist, shapes fit);
- :meth:`Scorer.setup`: loads the model, once per process, never in ``__init__``, so
  a scorer stays small and picklable (Ray actors, worker processes);
- :meth:`Scorer.score`: one :class:`Batch` in, named numpy arrays (one row each) out;
  :meth:`Scorer.embeddings` names the 2-D ones (cached as float16 ``.npy``, read by
  filters as embedding kinds).

:class:`filtering.stages.scorer_stage.ScorerStage` owns the loop every scorer shares:
shard by shard, read the cached result (``DIR/cache/scorer-<name>-<fp>/<shard>.parquet``,
keyed by what the shard's input was), or compute it in batches and cache it; failed rows
get nulls.
Scorers that read images cannot run on the pool (it holds no pixels): the planner hands
them to the source stage, whose decode pass feeds them (WebDataset:
:mod:`filtering.stages.webdataset`, each cached under its own
``scorer-<name>-<fp>/``); a source without images rejects them at plan time.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from filtering.sources import source_info

# pyarrow (and the pool, which needs it) is imported where used: the source's decode
# workers import this module to unpickle image scorers, and start faster without it.
if TYPE_CHECKING:
    import pyarrow as pa

    from filtering.pool import ShardPart

BATCH_ROWS = 65_536  # rows per score() call: bounded memory, large enough for BLAS


class ScorerParams(BaseModel):
    """Base for scorer parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


@dataclass(frozen=True)
class Needs:
    """What a scorer reads. ``embedding``: it reads an embedding kind, ``embedding_kind``
    (None: the pool's default, CLIP ``image`` for shards, ``l14_img`` for DataComp)."""

    embedding: bool = False
    embedding_kind: str | None = None
    columns: frozenset[str] = frozenset()
    captions: bool = False
    images: bool = False  # decoded images (PIL, in their own mode), one per call, in the decode workers
    pixels: bool = False  # uint8 NHWC output of the scorer's transform(), batched where its model is

    @property
    def reads_images(self) -> bool:
        return self.images or self.pixels

    def pool_columns(self, caption_column: str = "caption") -> set[str]:
        return set(self.columns) | ({caption_column} if self.captions else set())


@dataclass(frozen=True)
class InputInfo:
    """What a scorer may know about the input before any data is read."""

    kind: str  # "webdataset" | "datacomp"
    embedding_dims: dict[str, int] = field(default_factory=dict)  # known ones, e.g. {"l14_img": 768}


@dataclass
class Batch:
    """Consecutive rows of one shard: the embeddings, columns, images or pixels a scorer
    asked for. Image batches hold only the rows whose image decoded (and, for pixels,
    went through the transform); the source leaves the others null."""

    part: ShardPart | None = None  # None for image batches (the pool does not exist yet)
    start: int = 0  # first row, relative to the part
    embeddings: np.ndarray | None = None  # float32 (rows, dim)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    images: list | None = None  # PIL images as decoded (Needs.images)
    pixels: np.ndarray | None = None  # uint8 (rows, H, W, 3) from the scorer's transform (Needs.pixels)

    @property
    def rows(self) -> int:
        for value in (self.embeddings, self.pixels, self.images):
            if value is not None:
                return len(value)
        return len(next(iter(self.columns.values()))) if self.columns else 0


class Done:
    """A result computed at once, for :meth:`Scorer.submit`."""

    def __init__(self, value: dict[str, np.ndarray]):
        self.value = value

    def result(self) -> dict[str, np.ndarray]:
        return self.value


class Scorer(ABC):
    """One score computation. Subclasses set ``kind`` and ``Params`` and implement the rest."""

    kind: ClassVar[str]
    Params: ClassVar[type[ScorerParams]] = ScorerParams
    version: ClassVar[int] = 1  # bump when the computation changes: old caches are then not reused

    def __init__(self, params: BaseModel, input_info: InputInfo, path: str = "scorers"):
        self.params = params
        self.input = input_info
        self.path = path  # the config key path, for messages
        self._ready = False

    @property
    def name(self) -> str:
        return getattr(self.params, "name", None) or self.kind

    @property
    def label(self) -> str:
        """How progress bars and log lines name this scorer: its column name by default."""
        return self.name

    @abstractmethod
    def provides(self) -> tuple[str, ...]:
        """The columns this scorer adds."""

    def needs(self) -> Needs:
        return Needs()

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the input that changes the result (weights digest, settings)."""
        return self.params.model_dump(mode="json")

    def check(self) -> None:
        """Plan-time checks that read no pool data; raise ``ConfigError`` naming the key."""
        return None

    def setup(self) -> None:
        """Load models or weights; called once per process before the first :meth:`score`."""
        return None

    @abstractmethod
    def score(self, batch: Batch) -> dict[str, np.ndarray]:
        """One array per provided column (and per :meth:`embeddings` kind, ``(rows, dim)``),
        ``batch.rows`` long."""

    def embeddings(self) -> tuple[str, ...]:
        """Embedding kinds this scorer writes (image scorers only): 2-D float arrays in
        :meth:`score`'s result, cached as float16 ``<shard>.<kind>.npy``."""
        return ()

    def embedding_dims(self) -> dict[str, int]:
        """The width of each :meth:`embeddings` kind, after :meth:`setup`."""
        return {}

    def column_types(self) -> dict[str, pa.DataType]:
        """The Arrow type of each provided column (rows it could not score are null)."""
        import pyarrow as pa

        return dict.fromkeys(self.provides(), pa.float32())

    def transform(self):
        """``Needs.pixels`` scorers: the picklable PIL transform (image -> image) the decode
        workers apply before :meth:`score` sees the pixels; may load what it needs."""
        return None

    @property
    def device(self) -> str:
        """Where :meth:`setup` puts the model (``auto``, ``cpu``, ``cuda``...): executors size
        their model workers by it."""
        return "cpu"

    def placed(self, device: str) -> Scorer:
        """A copy that runs on ``device`` (a Ray actor's own GPU); scorers without a model: self."""
        return self

    def info(self) -> dict[str, Any] | None:
        """What ran, after :meth:`setup` (versions, checksums): cached beside the results."""
        return None

    def submit(self, batch: Batch):
        """Start scoring ``batch``; ``result()`` of the returned object gives :meth:`score`'s
        arrays. Models on a GPU override it to overlap the next batch's copy with this one."""
        return Done(self.score(batch))

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "columns": list(self.provides()),
            "params": self.params.model_dump(mode="json", exclude_none=True),
        }

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only: loaded models stay behind, ``setup`` reloads."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_model")}
        state["_ready"] = False
        return state


def input_info(input_kind: str, model_arch: str | None = None) -> InputInfo:
    """Embedding sizes known without reading data: those the source states (DataComp's
    npz arrays), or the CLIP model's ``embed_dim`` from its JSON config (read as a file,
    open_clip not imported)."""
    known = source_info(input_kind).embedding_dims
    if known:
        return InputInfo(input_kind, dict(known))
    dim = _clip_embed_dim(model_arch) if model_arch else None
    return InputInfo(input_kind, {"image": dim, "text": dim} if dim else {})


def _clip_embed_dim(arch: str) -> int | None:
    import importlib.util

    candidates = [Path(arch)] if arch.endswith(".json") else []
    candidates.append(Path(__file__).resolve().parent.parent / "models" / "configs" / f"{arch}.json")
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        candidates += [Path(loc) / "model_configs" / f"{arch}.json" for loc in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            try:
                return int(json.loads(c.read_text())["embed_dim"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None


REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    if cls.kind in REGISTRY and REGISTRY[cls.kind] is not cls:
        raise ValueError(f"scorer kind {cls.kind!r} registered twice")
    REGISTRY[cls.kind] = cls
    return cls
