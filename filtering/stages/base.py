"""Stages add columns to the pool; the runner runs those whose outputs some filter needs.

A source stage builds the pool (scoring WebDataset shards, or reading DataComp
metadata); later stages (clusters, ...) add columns and artifacts. Stages declare what
they provide, so a config whose filters need a column nothing provides fails before any
data is read. Heavy models load lazily through the context, once per process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from filtering.errors import PoolsiftError
from filtering.settings import ModelConfig
from filtering.sources import SourceInfo

if TYPE_CHECKING:
    import numpy as np

    from filtering.pool import Pool


@dataclass
class RunContext:
    """What stages share during one run."""

    out_dir: str
    cache_dir: str
    model: ModelConfig | None = None  # the CLIP model :meth:`clip` loads (the run's ``model`` section)
    executor: Any = None  # has .score(stage, urls, ctx); None = in-process
    progress: Callable[..., Any] | None = None  # tqdm-like factory
    log: Callable[[str], None] = print
    model_info: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    stage_info: dict[str, Any] = field(default_factory=dict)
    _clip: Any = None

    def clip(self):
        """The configured CLIP model, loaded on first use."""
        if self._clip is None:
            from filtering.models import clip as clip_models

            m = self.model
            if m is None:
                raise PoolsiftError("no model configured: the run context was made without one")
            self._clip = clip_models.load_clip(m.arch, m.pretrained, m.device, m.precision)
        return self._clip

    def bar(self, total: int | None, desc: str, unit: str = "samples"):
        """A progress bar from ``progress``; without one, a disabled tqdm (same methods, prints nothing)."""
        if self.progress is None:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit, disable=True)
        return self.progress(total=total, desc=desc, unit=unit)


class Stage(ABC):
    name: ClassVar[str]

    @abstractmethod
    def provides(self) -> set[str]:
        """Columns and artifacts this stage adds."""


class SourceStage(Stage):
    """Builds the pool. Constructing one must not touch data (``poolsift validate`` plans
    runs with it); input paths are resolved by :meth:`check_inputs`. ``info``
    states what depends on the input kind (:class:`SourceInfo`)."""

    info: ClassVar[SourceInfo]

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` record: ``info`` and where this run's scores are cached."""
        return self.info.to_dict()

    def check_inputs(self) -> None:
        """Resolve the input paths, raising ``InputError`` if they are missing; the runner
        calls it before anything is written."""

    def embeddings(self) -> tuple[tuple[str, ...], str | None] | None:
        """The embedding kinds the pool will have and the default one, known before any
        data is read (the planner checks every filter's and stage's needs against them);
        None when that cannot be known yet (the input is then checked when read). May
        list the input, never reads it."""
        return (), None

    def add_image_scorer(self, scorer, internal: bool = False) -> None:
        """Run ``scorer`` (a :class:`filtering.scorers.base.Scorer` that reads images) in the
        source's decode pass (``internal``: a filter's own, its columns left out of the
        outputs); sources without images refuse it."""
        from filtering.errors import ConfigError

        raise ConfigError(
            f"{scorer.path}: reads decoded images, which the {self.info.kind} input does not have; "
            "use input.shards (WebDataset)"
        )

    # --- the streaming plan (pipelines/executors/streaming.py): the pool one shard at a time.
    # A source that streams implements these; the plan never asks what kind of input it is.

    def stream_why_not(self) -> str | None:
        """Why this source cannot stream (None: it can); called before anything is read."""
        return f"input {self.info.kind} has no one-shard pool"

    def stream_shards(self) -> list:
        """The shards, in pool order (each picklable: it is sent to the workers)."""
        raise NotImplementedError

    def stream_prepare(self, ctx: RunContext) -> None:
        """In the driver, before any worker: the pool-wide decisions a one-shard pool needs
        (kept on ``self``, which travels to the workers) and the run records that do not
        depend on the rows."""

    def shard_scores(self, shard, names: list[str]) -> dict[str, np.ndarray]:
        """The score columns ``names`` of one shard's readable (non-failed) rows, as the
        top_fraction threshold reads them."""
        raise NotImplementedError

    def shard_rows(self, shard) -> int:
        """One shard's row count (cheap: a footer)."""
        raise NotImplementedError

    def shard_pool(self, shard, ctx: RunContext) -> Pool:
        """The one-shard pool: ``shard``'s rows, with the whole pool's columns and types (every shard's alike)."""
        raise NotImplementedError

    def skeleton_pool(self, counts: list[int]) -> Pool:
        """The whole pool as a ``"global"`` column stage's whole-pool step reads it
        (``ImageClustersStage.find_targets``): the shard parts (``counts`` rows each, in
        pool order), the embeddings read per shard as :meth:`shard_pool`'s pools read them, and
        the failed rows when the source has any (an ``error`` column: a validity bitmap,
        as ``Pool.failed`` reads it); no other column."""
        raise NotImplementedError

    def pool_error(self, error: Exception) -> Exception:
        """The error the whole pool gives where a one-shard pool raised ``error`` (a count
        over every shard, not one's); made only on that error path, so a run that succeeds
        pays nothing for it. ``error`` itself when the two agree."""
        return error

    def shard_record(self, ctx: RunContext, pool: Pool) -> Any:
        """What a worker returns about its shard for :meth:`stream_record` (picklable)."""
        return None

    def stream_record(self, ctx: RunContext, records: list, shards: list, rows: int) -> None:
        """The source's run records (``ctx.inputs``, ``ctx.stage_info``) from the shards' records."""


class ColumnStage(Stage):
    """Adds columns to the pool. ``scope`` declares how the shard plan runs it
    (docs/architecture.md, "Data flow of one run"):

    - ``"shard"``: each shard's rows alone, in the workers (``run`` on a one-shard pool);
    - ``"global"``: a whole-pool step first, in the driver, from the shards' row counts
      and the source's embeddings, never a column (:meth:`prepare`: a small, picklable
      result), then each shard's rows in the workers (:meth:`run_shard`);

    There is no whole-pool scope: a stage that declares none runs per shard.
    """

    scope: str = "shard"

    def prepare(self, ctx: RunContext, source: SourceStage, shard_rows: list[int]) -> Any:
        """``scope == "global"``: the whole-pool step; its result is handed to :meth:`run_shard`."""
        raise NotImplementedError

    def run_shard(self, ctx: RunContext, pool: Pool, prepared: Any) -> None:
        """``scope == "global"``: the columns of one shard's pool, given :meth:`prepare`'s result."""
        raise NotImplementedError

    def merge_records(self, record: dict[str, Any], shard_records: list[dict[str, Any]]) -> dict[str, Any]:
        """``scope == "global"``: the run's record (``ctx.stage_info[name]``) from the
        driver's (``prepare``) and the shards' (``run_shard``)."""
        return record

    def embeddings_required(self) -> dict[str, str | None]:
        """Embedding kinds this stage reads, by the config key that names each (None:
        the pool's default); the planner checks them against the source's before any data is read."""
        return {}

    def run(self, ctx: RunContext, pool: Pool) -> None:
        """``scope == "shard"``: the columns of one shard's pool (the scorers: every row
        alone). A global stage has none: its work is :meth:`prepare` then :meth:`run_shard`."""
        raise NotImplementedError
