"""``poolsift sweep``: one config value tried at several settings, from cached stage results.

How DataComp's authors picked "CLIP score, top 30%": by looking at subset sizes over a
range of thresholds. A sweep runs each value's config, re-parsed exactly as ``--set
key.path=value`` would, on the shard plan (``pipelines/executors/streaming.py:
count_streaming``): the columns come from the per-shard caches (no model is loaded when
the pool was scored before; shards not scored yet are scored once), the reductions
(``top_fraction`` thresholds, uid repeats, dedup survivors) run per value, and the filter
pass only counts. No process holds the pool. It records, per value, the subset size, the
thresholds and each filter's funnel counts, as the run's manifest would give them, without
writing any subset. ``DIR/sweep.json`` keeps the result; the report draws it.

A sweep is about the run in its output directory: where ``DIR/manifest.json`` records
settings the config file (with the sweep's own ``--set``) does not have, such as a
``run --set`` the sweep was not given, the sweep takes the run's values and says so.
``sweep.json`` records the settings' hash and the run's config hash, and any setting the
sweep's own ``--set`` made differ from the run's, so the report can leave out a sweep of
another run and say when the sweep's base differs from the run beside it.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from typing import Any

import yaml

from filtering.errors import ConfigError
from filtering.io.atomic import atomic_write_text, exists, makedirs
from filtering.io.paths import join
from filtering.provenance import now_iso, settings_sha256
from filtering.stages.base import RunContext
from filtering.writers.commit import recover
from pipelines.config import Config, apply_override, config_paths, load_raw, parse_config
from pipelines.executors import streaming
from pipelines.lock import output_lock
from pipelines.runner import language_identifiers, plan, progress_factory


def parse_param(spec: str) -> tuple[str, list[str]]:
    """``filters[0].clip_score.top_fraction=0.1,0.2,0.3`` -> (key path, ["0.1", "0.2", "0.3"]).

    Values split at commas outside brackets, braces and quotes, so YAML lists and
    mappings are values too: ``filters[1].language.languages=[en],[en, de]``.
    """
    key, sep, values = spec.partition("=")
    vals = [v.strip() for v in _split_values(values) if v.strip()]
    if not sep or not key.strip() or not vals:
        raise ConfigError(f"--param {spec!r}: expected key.path=value1,value2,...")
    return key.strip(), vals


def _split_values(text: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _pool_key(cfg: Config, the_plan) -> str:
    """What determines the pool a value's filters see: everything but filters and output,
    the column stages chosen and the columns the filters need."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("filters", "output")}
    needed = sorted({c for node in cfg.filter_tree for f in node.leaves() for c in f.requires()})
    stages = [type(s).__name__ for s in the_plan.stages]
    return json.dumps([settings, stages, needed], sort_keys=True)


def sweep(
    config_path: str,
    param: str,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = False,
    log=None,
    executor=None,
) -> dict[str, Any]:
    """Run the sweep; returns what ``sweep.json`` holds (also written to the output dir).
    ``executor``: where the shard plan's tasks run (None: local processes; Ray's)."""
    log = log or (lambda msg: print(f"poolsift: {msg}", file=sys.stderr))
    key, values = parse_param(param)
    written: dict[str, tuple[str, str]] = {}
    raw = load_raw(config_path, written)
    for assignment in overrides:
        apply_override(raw, assignment)
    base = parse_config(raw)
    run = _read_manifest(base.output.dir)
    differs: list[dict[str, Any]] = []
    if run is not None:
        taken, differs = _rebase_on_run(raw, base, run.get("config") or {}, key, overrides)
        if taken:
            log(
                f"sweep: based on the run in {base.output.dir}, whose settings differ from {config_path}: "
                + ", ".join(f"{d['key']}={json.dumps(d['run'])} (file: {json.dumps(d['sweep'])})" for d in taken)
            )
            base = parse_config(raw)
        if differs:
            log(
                "sweep: these settings differ from the run's (the report says so): "
                + ", ".join(
                    f"{d['key']} (sweep: {json.dumps(d['sweep'])}, run: {json.dumps(d['run'])})" for d in differs
                )
            )
    configs = []
    for value in values:
        variant = copy.deepcopy(raw)
        apply_override(variant, f"{key}={value}")
        cfg = parse_config(variant)
        cfg._written_paths = written
        configs.append((yaml.safe_load(value), cfg))
    out_dirs = {cfg.output.dir for _, cfg in configs}
    if len(out_dirs) != 1:
        raise ConfigError(f"--param {key}: a sweep works in one output directory; this changes output.dir")
    out_dir = out_dirs.pop()
    cache_root = join(out_dir, "cache")
    plans = [plan(cfg, cache_root) for _, cfg in configs]  # every value's config checked before any work
    for (_, cfg), the_plan in zip(configs, plans, strict=True):
        reason = streaming.why_not(cfg, the_plan, executor)
        if reason is not None:
            raise ConfigError(f"--param {key}: the shard plan cannot run this config: {reason}")
    # the values whose pools are the same (settings but the filters): one source, prepared once
    groups: dict[str, list[int]] = {}
    for k, ((_, cfg), the_plan) in enumerate(zip(configs, plans, strict=True)):
        groups.setdefault(_pool_key(cfg, the_plan), []).append(k)
    notes = {}
    for _, cfg in configs:  # a missing language model fails (or is fetched) before any shard is read
        notes.update((r["note"], None) for r in language_identifiers(cfg, progress))
    counts: list[dict[str, Any]] = [{} for _ in configs]
    makedirs(out_dir)
    with output_lock(out_dir):
        if note := recover(out_dir):  # a switch a killed run began, before the report reads the result
            log(note)
        for note in notes:
            log(note)
        for members in groups.values():
            source = plans[members[0]].source
            source.check_inputs()
            ctx = RunContext(
                model=configs[members[0]][1].model,
                out_dir=out_dir,
                cache_dir=cache_root,
                executor=executor,
                progress=progress_factory(progress),
                log=log,
            )
            runs = [(configs[k][1], replace(plans[k], source=source)) for k in members]
            for k, c in zip(members, streaming.count_streaming(runs, ctx), strict=True):
                counts[k] = c
        results = []
        for (value, _), c in zip(configs, counts, strict=True):
            thresholds = {k: (None if v is None else float(v)) for k, v in c["thresholds"].items()}
            results.append(
                {
                    "value": value,
                    "input": int(c["input"]),
                    "failed": int(c["failed"]),
                    "kept": int(c["kept"]),
                    "thresholds": thresholds,
                    "filters": c["filters"],
                }
            )
        record = {
            "param": key,
            "values": [v for v, _ in configs],
            "config": str(config_path),
            "overrides": list(overrides),
            "settings_sha256": settings_sha256(base.to_dict()),
            "run_config_sha256": run.get("config_sha256") if run else None,
            "differs_from_run": differs,
            "created_at": now_iso(),
            "results": results,
        }
        atomic_write_text(join(out_dir, "sweep.json"), json.dumps(record, indent=2) + "\n")
        if exists(join(out_dir, "manifest.json")) and (
            configs[0][1].output.report or exists(join(out_dir, "report.html"))
        ):
            from filtering.report import write_report

            write_report(out_dir, log=log)
    record["out_dir"] = out_dir
    return record


def _read_manifest(out_dir: str) -> dict[str, Any] | None:
    path = join(out_dir, "manifest.json")
    if not exists(path):
        return None
    from filtering.io.paths import open_file

    try:
        with open_file(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None  # an unreadable manifest: the sweep stands on the config file alone


def _differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(key path, a's value, b's value)`` where two config dicts differ: leaves, or the
    whole subtree where their shapes differ (other keys, another list length)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}" if path else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def _overlaps(key: str, other: str) -> bool:
    """Whether one key path lies within the other (``filters[0]`` and ``filters[0].clip_score.min``)."""
    short, long = sorted((key, other), key=len)
    return long == short or long.startswith((short + ".", short + "["))


def _rebase_on_run(raw: dict, base: Config, run_config: dict, param: str, overrides) -> tuple[list, list]:
    """Set in ``raw`` the run's value of every setting where the run differs from the sweep's
    base, except the swept one, output settings, paths (written relative to each command's
    working directory) and those the sweep's own ``--set`` names. Returns (the settings
    taken from the run, the ones that still differ), each as ``{key, sweep, run}``."""
    mine = base.to_dict()
    paths = {k for k, _, _ in config_paths(mine)} | {k for k, _, _ in config_paths(run_config)}
    explicit = [o.split("=", 1)[0].strip() for o in overrides]
    taken, differs = [], []
    found = [
        d for top in sorted(set(mine) | set(run_config)) for d in _differences(mine.get(top), run_config.get(top), top)
    ]
    for k, ours, theirs in found:
        if _overlaps(k, param) or _overlaps(k, "output") or any(_overlaps(k, p) for p in paths):
            continue
        entry = {"key": k, "sweep": ours, "run": theirs}
        # A whole section or list of another shape (an edited file, an older manifest) is
        # reported, not copied: it may hold paths written relative to another directory.
        if any(_overlaps(k, e) for e in explicit) or isinstance(ours, dict | list) or isinstance(theirs, dict | list):
            differs.append(entry)
            continue
        apply_override(raw, f"{k}={json.dumps(theirs)}")
        taken.append(entry)
    return taken, differs


def _steps(filters: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Each funnel step as (name, how many steps of that name came before it)."""
    seen: dict[str, int] = {}
    keys = []
    for f in filters:
        keys.append((f["name"], seen.get(f["name"], 0)))
        seen[f["name"]] = seen.get(f["name"], 0) + 1
    return keys


def format_sweep(record: dict[str, Any]) -> str:
    """The sweep as a text table: value, rows kept, share of input, thresholds, drops per filter.
    Values whose funnels differ (a sweep over the filter list, or over ``input.uid.duplicates``)
    share one column per step, in funnel order, ``-`` where a value has no such step."""
    results = record["results"]
    columns: list[tuple[str, int]] = []
    for r in results:
        at = 0
        for key in _steps(r["filters"]):
            if key in columns:
                at = columns.index(key) + 1
            else:
                columns.insert(at, key)
                at += 1
    header = [record["param"], "kept", "of input", "threshold"] + [f"{n} dropped" for n, _ in columns]
    rows = []
    for r in results:
        thr = ", ".join("all" if t is None else f"{t:.4f}" for t in r["thresholds"].values()) or "-"
        pct = f"{100.0 * r['kept'] / r['input']:.1f}%" if r["input"] else "-"
        dropped = {key: f"{f['dropped']:,}" for key, f in zip(_steps(r["filters"]), r["filters"], strict=True)}
        rows.append([str(r["value"]), f"{r['kept']:,}", pct, thr] + [dropped.get(key, "-") for key in columns])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines += [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    return "\n".join(lines)
