"""The stage graph of one run: source stage, column stages, filters, writers, manifest.

Planning happens before any data is read: the filters' required columns must be
provided by the source stage or a column stage, or the config is rejected naming the
filter and the column. Stage results are cached per shard, so a rerun with other filter
settings only re-applies filters and rewrites outputs.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from filtering.dedup.index import INDEX, IndexBuilder, shard_index_tables
from filtering.errors import ConfigError
from filtering.filters.base import add_tally
from filtering.filters.compose import FilterNode, FilterOutcome, apply_filters
from filtering.io.atomic import atomic_write_text, makedirs, remove_temp_files
from filtering.io.paths import join
from filtering.pool import Pool
from filtering.provenance import provenance
from filtering.stages.base import ColumnStage, RunContext, SourceStage
from filtering.tasks import executor_workers, thread_pool
from filtering.writers.commit import MANIFEST, Staged, file_records, recover, staged_result
from filtering.writers.parquet import (
    HEX_COLUMNS,
    dropped_table,
    remove_parts,
    subset_stream,
    write_parts,
    write_parts_stream,
)
from filtering.writers.uids import write_uids
from pipelines.config import Config, check_local_paths, input_kind
from pipelines.executors.uid_phase import check_duplicate_uids
from pipelines.lock import output_lock
from pipelines.manifest import (
    MAX_MANIFEST_FAILURES,
    PhaseClock,
    check_funnel,
    execution_record,
    json_default,
    manifest_record,
    model_record,
    tally_reports,
)


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
    stages.extend(dedup_search_stages(cfg, cache_root))
    return stages


def dedup_search_stages(cfg: Config, cache_root: str) -> list[ColumnStage]:
    """One candidate search per distinct search settings of the ``dedup`` filters
    (``filtering/dedup/search_stage.py``): computed once, cached, read by the filters."""
    from filtering.dedup.search_stage import DedupSearchStage

    settings = []
    for node in cfg.filter_tree:
        for f in node.leaves():
            search = getattr(f, "search_settings", lambda: None)()
            if search is not None and search not in settings:
                settings.append(search)
    stages: list[ColumnStage] = [DedupSearchStage(s, cache_root) for s in settings]
    return stages + dedup_against_stages(cfg, cache_root)


def dedup_against_stages(cfg: Config, cache_root: str) -> list[ColumnStage]:
    """One search against earlier outputs per distinct ``against`` of the ``dedup`` filters
    (``filtering/dedup/against.py``); on the shard plan its dedup phase searches instead."""
    from filtering.dedup.against import DedupAgainstStage

    settings = []
    for node in cfg.filter_tree:
        for f in node.leaves():
            against = getattr(f, "against_settings", lambda: None)()
            if against is not None and against not in settings:
                settings.append(against)
    return [DedupAgainstStage(s, cache_root) for s in settings]


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
    pool: Pool | None  # None on the streaming plan: no process held the pool
    outcome: FilterOutcome | None


def progress_factory(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    def make(total=None, desc="", unit="samples"):
        return tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    return make


def run(cfg: Config, executor=None, progress: bool = True, log=None) -> RunResult:
    out_dir = cfg.output.dir
    cache_root = join(out_dir, "cache")
    log = log or (lambda msg: print(f"poolsift: {msg}", file=sys.stderr))
    the_plan = plan(cfg, cache_root)
    the_plan.source.check_inputs()
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
            pool, outcome = None, None  # on the streaming plan no process holds the pool
            manifest = streamed(cfg, the_plan, ctx, executor, result)
            if manifest is None:
                clock = PhaseClock()
                pool = the_plan.source.run(ctx)
                clock.lap("source")
                for stage in the_plan.stages:
                    stage.run(ctx, pool)
                clock.lap("stages")
                nodes = list(cfg.filter_tree)
                dup = check_duplicate_uids(pool, cfg.input.uid.duplicates, ctx)
                if dup is not None:
                    nodes.insert(0, dup)
                outcome = apply_filters(nodes, pool)
                clock.lap("filter")
                manifest = write_outputs(cfg, ctx, pool, outcome, the_plan.source, result, nodes, clock)
            if cfg.output.report:
                from filtering.report import write_report

                write_report(result.dir, log=log, shown_as=out_dir)
            result.switch()
    return RunResult(out_dir, manifest, pool, outcome)


def streamed(cfg: Config, the_plan: Plan, ctx: RunContext, executor, result: Staged) -> dict[str, Any] | None:
    """The run on the streaming plan (pipelines/executors/streaming.py) when ``execution.mode``
    allows it and the outputs equal the in-memory path's; its manifest, or None."""
    if cfg.execution.mode == "memory":
        return None
    from pipelines.executors import streaming

    reason = streaming.why_not(cfg, the_plan, executor)
    if reason is not None:
        if cfg.execution.mode == "streaming":
            raise ConfigError(f"execution.mode: streaming is not possible for this run: {reason}")
        return None
    return streaming.run_streaming(cfg, the_plan, ctx, result)


def write_outputs(
    cfg: Config,
    ctx: RunContext,
    pool: Pool,
    outcome: FilterOutcome,
    source: SourceStage,
    result: Staged,
    nodes: list[FilterNode] | None = None,
    clock: PhaseClock | None = None,
) -> dict[str, Any]:
    """Every output and the manifest, into the staged result (``result.url``); the
    manifest names each file as it will be after the switch (``result.final``).
    ``nodes``: the filter list ``outcome`` came from (its tallies' reports, by position);
    ``clock``: the phases so far, for the manifest's ``execution`` record (writing is the last)."""
    clock = clock if clock is not None else PhaseClock()
    out = cfg.output
    failed = pool.failed
    config_dict = cfg.to_dict()
    model = model_record(cfg, ctx, source)
    prov = provenance(config_dict, cfg.sha256(), model)

    hex_columns = HEX_COLUMNS | set(source.info.hex_columns)  # stored like the uid (see HEX_COLUMNS)

    def side_outputs() -> dict[str, Any]:
        """subset.npy and the dropped rows: written on a thread while the subset streams."""
        done = {"subset_npy": result.url("subset.npy")}
        write_uids(done["subset_npy"], pool.table.column("uid").filter(pa.array(outcome.keep)))
        if out.dropped:
            table = dropped_table(
                pool.table,
                outcome,
                failed,
                pool.artifacts.get("carried_columns", ()),
                key=not pool.artifacts.get("key_is_uid"),
            )
            done["dropped"] = write_parts(
                result.url("dropped"), table, out.rows_per_part, prov, hex_columns, by="source_shard"
            )
        else:
            remove_parts(result.url("dropped"))  # remote output: an earlier audit trail would not match
        return done

    with thread_pool(1) as side:  # pyarrow encodes and writes without the GIL
        pending = side.submit(side_outputs)
        schema, tables = subset_stream(pool, outcome.keep)
        # the index of the kept rows (filtering/dedup/index.py), one file per source shard, as they stream by
        index = IndexBuilder(result.url(INDEX), source.info.kind, pool.embedding_kinds)
        tables = shard_index_tables(pool, outcome.keep, tables, index.add)
        subset_parts = write_parts_stream(  # parts follow the pool: one source shard each (docs/spec.md)
            result.url("subset"), tables, schema, out.rows_per_part, prov, hex_columns, by="source_shard"
        )
        outputs: dict[str, Any] = {"subset": subset_parts}
        index_files = index.finish([p.url for p in pool.parts])
        outputs.update(pending.result())
        outputs["index"] = index_files[-1]  # index.json; its parts are listed in the manifest's files
    if out.report:
        outputs["report"] = result.url("report.html")  # written after the manifest, from it
    if out.webdataset:
        from filtering.writers.webdataset import reshard

        outputs["shards"] = reshard(pool, outcome.keep, result.url("shards"), out.samples_per_shard, ctx)
    sums = {k: add_tally(None, t) for k, t in outcome.tallies.items()}  # one pool: its tallies are the sums
    reports, report_paths = tally_reports(nodes or list(cfg.filter_tree), sums, result, prov, ctx.log)
    outputs.update(report_paths)
    written = [
        *outputs["subset"],
        outputs["subset_npy"],
        *outputs.get("dropped", []),
        *outputs.get("shards", []),
        *[p for paths in report_paths.values() for p in paths],
        *index_files,
    ]
    files = file_records(result.dir, written)
    outputs = {k: [result.final(p) for p in v] if isinstance(v, list) else result.final(v) for k, v in outputs.items()}

    fail_idx = np.flatnonzero(failed)
    failures, reasons = [], Counter()
    if len(fail_idx):  # only the failed rows are materialised as Python objects
        rows = pool.table.select(["source_shard", "key", "uid", "error"]).take(fail_idx)
        reasons = Counter(str(e).split(":", 1)[0] for e in rows.column("error").to_pylist())
        failures = (
            rows.slice(0, MAX_MANIFEST_FAILURES).rename_columns(["source_shard", "key", "uid", "reason"]).to_pylist()
        )
    failures += ctx.failures
    counts = {
        "input": int(pool.n),
        "failed": int(failed.sum()),
        "failed_reasons": dict(sorted(reasons.items())),
        "kept": int(outcome.keep.sum()),
        "filters": outcome.funnel,
    }
    check_funnel(counts)
    manifest = manifest_record(
        config_dict,
        prov,
        model,
        source,
        ctx,
        counts=counts,
        thresholds=outcome.thresholds,
        language_identifiers=pool.artifacts.get("language_identifiers", []),
        failures=failures,
        failures_truncated=len(fail_idx) > MAX_MANIFEST_FAILURES,
        outputs=outputs,
    )
    manifest.update(reports)
    if "reshard_map" in pool.artifacts:
        manifest["shards"] = [{**s, "path": result.final(s["path"])} for s in pool.artifacts["reshard_map"]]
    manifest["files"] = files
    clock.lap("write")
    manifest["execution"] = execution_record("memory", ctx.executor, executor_workers(ctx.executor), clock.seconds)
    atomic_write_text(result.url(MANIFEST), json.dumps(manifest, indent=2, default=json_default) + "\n")
    return manifest


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
