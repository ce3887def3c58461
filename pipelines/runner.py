"""The stage graph of one run: source stage, column stages, filters, writers, manifest.

Planning happens before any data is read: the filters' required columns must be
provided by the source stage or a column stage, or the config is rejected naming the
filter and the column. Stage results are cached per shard, so a rerun with other filter
settings only re-applies filters and rewrites outputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from filtering.errors import ConfigError
from filtering.io.atomic import makedirs, remove_temp_files
from filtering.io.paths import join
from filtering.stages.base import ColumnStage, RunContext, SourceStage
from filtering.writers.commit import recover, staged_result
from pipelines.config import Config, check_local_paths, input_kind
from pipelines.executors import streaming
from pipelines.lock import output_lock


def source_stage(cfg: Config, cache_root: str) -> SourceStage:
    if input_kind(cfg) == "datacomp":
        from filtering.stages.datacomp import DataCompStage

        return DataCompStage(cfg.input.datacomp_metadata, cache_root)
    from filtering.stages.webdataset import WebDatasetStage

    return WebDatasetStage(
        cfg.input.shards,
        cfg.model,
        cache_root,
        cfg.input.uid,
        output_dir=cfg.output.dir,
        image_formats=cfg.input.image_formats,
    )


def column_stages(cfg: Config, cache_root: str) -> list[ColumnStage]:
    """Every column stage that could run, in dependency order; the plan keeps those needed."""
    stages: list[ColumnStage] = []
    from filtering.decontaminate.decontaminate_stage import DecontaminateStage
    from filtering.image_clusters.image_clusters_stage import ImageClustersStage

    stages.append(ImageClustersStage(cfg.clusters, cfg.model, cache_root, cfg.input.image_formats))
    stages.append(DecontaminateStage(cfg.filter_tree, cfg.model, cache_root, cfg.input.image_formats))
    return stages


def scorer_stages(cfg: Config, cache_root: str) -> list[ColumnStage]:
    """One stage per ``scorers:`` entry, each caching under its own fingerprint."""
    if not cfg.scorer_list:
        return []
    from filtering.stages.scorer_stage import ScorerStage

    return [ScorerStage(s, cache_root) for s in cfg.scorer_list]


def filter_scorer_stages(cfg: Config, cache_root: str, provided: set[str]) -> list[ColumnStage]:
    """The scorers the filters bring (``Filter.scorers()``, e.g. ``language``'s
    ``language_id``): one stage per scorer name, shared by the filters that name it;
    their columns are internal (read by filters, not written to the outputs)."""
    from filtering.stages.scorer_stage import ScorerStage

    stages: list[ColumnStage] = []
    seen = set(provided)
    for node in cfg.filter_tree:
        for f in node.leaves():
            for scorer in f.scorers():
                if set(scorer.provides()) <= seen:
                    continue
                stages.append(ScorerStage(scorer, cache_root, internal=True))
                seen |= set(scorer.provides())
    return stages


def add_scorer(stage, source: SourceStage, chosen: list[ColumnStage], cfg: Config) -> None:
    """A scorer that reads images runs in the source's decode pass (the pool holds no
    pixels); any other runs as a column stage on the pool."""
    stage.check(input_kind(cfg))
    if stage.reads_images:
        source.add_image_scorer(stage.scorer, internal=stage.internal)
    else:
        chosen.append(stage)


@dataclass
class Plan:
    source: SourceStage
    stages: list[ColumnStage]


def plan(cfg: Config, cache_root: str) -> Plan:
    """Choose the stages the filters need; reject configs that need a column nothing provides."""
    source = source_stage(cfg, cache_root)
    candidates = column_stages(cfg, cache_root)
    provided = set(source.provides())
    needed: set[str] = set()
    for node in cfg.filter_tree:
        for f in node.leaves():
            needed |= f.requires()
    chosen = []
    for stage in candidates:
        if stage.provides() & needed:
            chosen.append(stage)
            provided |= stage.provides()
            needed |= getattr(stage, "requires", lambda: set())()
    check_local_paths(cfg, under="scorers")  # a head loads its weights when built: name a missing file first
    for stage in scorer_stages(cfg, cache_root):  # configured scorers always run: their columns are outputs
        add_scorer(stage, source, chosen, cfg)
        provided |= stage.provides()
        needed |= stage.requires()
    for stage in filter_scorer_stages(cfg, cache_root, provided):
        add_scorer(stage, source, chosen, cfg)
        provided |= stage.provides()
        needed |= stage.requires()
    for node in cfg.filter_tree:
        for f in node.leaves():
            missing = f.requires() - provided
            if missing:
                raise ConfigError(
                    f"filters: {f.name} needs {sorted(missing)}, which no stage provides for "
                    f"{input_kind(cfg)} input (available: {sorted(provided)})"
                )
    if hasattr(source, "request"):  # sources that read only the columns asked for
        source.request(needed & source.provides())
    if cfg.output.webdataset and not source.info.images:
        raise ConfigError(
            f"output.webdataset: resharding copies samples from WebDataset shards, but the {source.info.kind} input "
            "has no images; use input.shards, or feed subset.npy to DataComp's resharder"
        )
    check_local_paths(cfg)  # every file the config names, before any shard is read
    for node in cfg.filter_tree:
        for f in node.leaves():
            f.check()  # the filters' own files (a uids list), read before any shard
    check_embeddings(cfg, source, chosen)
    return Plan(source, chosen)


def check_embeddings(cfg: Config, source: SourceStage, stages: list[ColumnStage]) -> None:
    """Every embedding kind a filter or stage reads must be one the source provides; the
    source may list its input to know (DataComp: which npz arrays exist), never reads it."""
    wanted: dict[str, str | None] = {}
    for node in cfg.filter_tree:
        for f in node.leaves():
            for kind in f.embeddings_required():
                wanted.setdefault(f"filters: {f.name}.embedding", kind)
    for stage in stages:
        for key, kind in stage.embeddings_required().items():
            wanted.setdefault(key, kind)
    if not wanted:
        return
    known = source.embeddings()
    if known is None:  # the input cannot be listed yet: it is checked when read
        return
    kinds, default = known
    for key, kind in wanted.items():
        if kind is None and default is None or kind is not None and kind not in kinds:
            what = f"embedding {kind!r}" if kind else "embeddings"
            has = f"it has {list(kinds)}" if kinds else getattr(source, "no_embeddings", "the input has none")
            raise ConfigError(f"{key}: reads {what}, which the {input_kind(cfg)} input does not provide; {has}")


def language_identifiers(cfg: Config, progress: bool = True) -> list[dict[str, Any]]:
    """Load each language filter's identifier before any data is read, so that a missing
    model fails early (or is downloaded first: fastText's lid.176.bin, with a bar unless
    ``progress`` is false) and the run can say which identifier runs (and any fallback).
    ``language_id`` entries under ``scorers:`` load here too."""
    from filtering.filters.language import LanguageFilter
    from filtering.scorers.language_id import LanguageIdScorer

    records: list[dict[str, Any]] = []
    for node in cfg.filter_tree:
        for f in node.leaves():
            if isinstance(f, LanguageFilter) and f.identity(progress) not in records:
                records.append(f.identity())
    for scorer in cfg.scorer_list:
        if isinstance(scorer, LanguageIdScorer):
            scorer.identity(progress)
    return records


@dataclass
class RunResult:
    out_dir: str
    manifest: dict[str, Any]


def progress_factory(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    def make(total=None, desc="", unit="samples"):
        return tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    return make


def run(cfg: Config, executor=None, progress: bool = True, log=None) -> RunResult:
    """The run on the shard plan (``pipelines/executors/streaming.py``), its outputs staged
    and switched into place whole; a config the plan cannot run fails here, in one line,
    before any data is read."""
    out_dir = cfg.output.dir
    cache_root = join(out_dir, "cache")
    log = log or (lambda msg: print(f"poolsift: {msg}", file=sys.stderr))
    the_plan = plan(cfg, cache_root)
    streaming.check(cfg, the_plan, executor)
    the_plan.source.check_inputs()
    for note in cfg.notes:
        log(note)
    for record in language_identifiers(cfg, progress):
        log(record["note"])
    makedirs(out_dir)
    with output_lock(out_dir):
        # what killed runs left: a switch to finish, half-written files; nobody else writes here now
        if note := recover(out_dir):
            log(note)
        remove_temp_files(out_dir)
        ctx = RunContext(
            model=cfg.model,
            out_dir=out_dir,
            cache_dir=cache_root,
            executor=executor,
            progress=progress_factory(progress),
            log=log,
        )
        # the new result is written beside the last one and replaces it whole (writers/commit.py)
        with staged_result(out_dir, log) as result:
            manifest = streaming.run_streaming(cfg, the_plan, ctx, result)
            if cfg.output.report:
                from filtering.report import write_report

                write_report(result.dir, log=log, shown_as=out_dir)
            result.switch()
    return RunResult(out_dir, manifest)


def format_funnel(manifest: dict[str, Any]) -> str:
    c = manifest["counts"]
    width = max([len(f["name"]) for f in c["filters"]] + [10])
    lines = [f"{'input':<{width}}  {c['input']:>10,}"]
    fr = ", ".join(f"{k} {v:,}" for k, v in c.get("failed_reasons", {}).items())
    lines.append(f"{'failed':<{width}}  {c['failed']:>10,}" + (f"  ({fr})" if fr else ""))
    for f in c["filters"]:
        why = ", ".join(f"{k} {v:,}" for k, v in f["reasons"].items())
        lines.append(
            f"{f['name']:<{width}}  {-f['dropped']:>+10,}  -> {f['kept']:,} left" + (f"  ({why})" if why else "")
        )
    pct = 100.0 * c["kept"] / c["input"] if c["input"] else 0.0
    lines.append(f"{'kept':<{width}}  {c['kept']:>10,}  ({pct:.1f}% of input)")
    return "\n".join(lines)
