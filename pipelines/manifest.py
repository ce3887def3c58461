"""The manifest: the run's record (docs/spec.md, "Output directory"), written last as the
commit of an output folder. Its body, the model record and the funnel check live here,
for the run that writes it, whatever its plan."""

from __future__ import annotations

from typing import Any

import numpy as np

from filtering.errors import FunnelError
from filtering.provenance import checksum_inputs, git_commit, now_iso
from filtering.stages.base import RunContext, SourceStage
from pipelines.config import Config

MAX_MANIFEST_FAILURES = 10_000


def model_record(cfg: Config, ctx: RunContext, source: SourceStage) -> dict[str, Any]:
    if source.info.model is not None:  # no model ran: the source says where the scores come from
        return dict(source.info.model)
    info = dict(ctx.model_info)
    return {
        "arch": info.get("arch", cfg.model.arch),
        "pretrained": info.get("pretrained", cfg.model.pretrained),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        **{k: v for k, v in info.items() if k not in ("arch", "pretrained", "checkpoint_sha256", "device")},
    }


def manifest_record(
    config_dict: dict[str, Any],
    prov: dict[str, Any],
    model: dict[str, Any],
    source: SourceStage,
    ctx: RunContext,
    *,
    counts: dict[str, Any],
    thresholds: Any,
    language_identifiers: list,
    failures: list,
    failures_truncated: bool,
    outputs: dict[str, Any],
) -> dict[str, Any]:
    """The manifest's common body (docs/spec.md, "Output directory"), for both plans; the
    callers add ``shards``, ``files`` and ``execution`` and write it last."""
    inputs, checksum_method = checksum_inputs(ctx.inputs)
    return {
        "poolsift_version": prov["poolsift_version"],
        "git_commit": git_commit(),
        "created_at": now_iso(),
        "config": config_dict,
        "config_sha256": prov["config_sha256"],
        "model": model,
        "input_kind": source.info.kind,
        "source": source.describe(),
        "inputs": inputs,
        "input_checksum": checksum_method,
        "counts": counts,
        "thresholds": thresholds,
        "language_identifiers": language_identifiers,
        "uids": ctx.stage_info.get("uids", {}),
        "stages": {k: v for k, v in ctx.stage_info.items() if k != "uids"},
        "failures": failures,
        "failures_truncated": failures_truncated,
        "outputs": outputs,
    }


def execution_record(plan: str, executor, workers: int, seconds: dict[str, float]) -> dict[str, Any]:
    """The manifest's ``execution`` record, the same keys on every run (docs/spec.md):
    ``plan`` (``streaming``: the shard plan, the only one),
    ``executor`` (``local`` or ``ray``), ``workers`` (how many tasks ran at once) and
    ``seconds`` per phase (wall, in the order they ran)."""
    return {
        "plan": plan,
        "executor": "ray" if executor is not None else "local",
        "workers": int(workers),
        "seconds": {k: round(float(v), 3) for k, v in seconds.items()},
    }


def check_funnel(counts: dict[str, Any]) -> None:
    """The manifest invariant: every input sample is kept, failed, or dropped by one filter."""
    dropped = sum(f["dropped"] for f in counts["filters"])
    if counts["input"] != counts["kept"] + counts["failed"] + dropped:
        raise FunnelError(
            f"funnel does not add up: input {counts['input']} != kept {counts['kept']} + failed {counts['failed']}"
            f" + dropped {dropped} (a bug in poolsift; please report it)"
        )


def json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def tally_reports(
    nodes: list, sums: dict[int, dict[str, Any]], result, prov: dict[str, Any], log
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Each top-level filter's report from its counts summed over the pool (a
    :class:`~filtering.filters.base.Tally` reduction, ``Filter.report``), on either plan:
    its tables written as ``DIR/<report_name>/<table>.parquet`` (``<position>-<table>``
    when two entries report under one name) into the staged ``result``, its record under
    ``manifest[<report_name>][<funnel label>]`` with the files it wrote. Returns the
    records ``{report_name: {label: record}}`` and the files written, ``{report_name: [url]}``
    (in the staged result)."""
    import pyarrow.parquet as pq

    from filtering.filters.compose import funnel_labels
    from filtering.io.atomic import atomic_open
    from filtering.writers.parquet import part_format

    labels = funnel_labels(nodes)
    out: dict[str, Any] = {}
    paths: dict[str, list[str]] = {}
    names = [nodes[k].filter.report_name for k in sorted(sums)]
    for k in sorted(sums):
        f = nodes[k].filter
        record, tables = f.report(sums[k], log)
        prefix = f"{k}-" if names.count(f.report_name) > 1 else ""
        record["files"] = {}
        for name, table in tables.items():
            url = result.url(f.report_name, f"{prefix}{name}.parquet")
            schema, options = part_format(table.schema, prov)
            with atomic_open(url, "wb", fsync=False) as fh:
                pq.write_table(table.cast(schema), fh, **options)
            paths.setdefault(f.report_name, []).append(url)
            record["files"][name] = result.final(url)
        out.setdefault(f.report_name, {})[labels[k]] = record
    return out, paths


def index_output(out_dir: str) -> tuple[str, int, bool]:
    """``poolsift index DIR``: the index of the kept rows (``filtering/dedup/index.py``) for
    an output written before runs wrote one, built from its subset parts into ``DIR/index/``
    and listed in its manifest (``files``, ``outputs.index``), under the output's lock.
    Returns ``(index folder, rows, whether it was built now)``."""
    import json
    import os
    import shutil

    from filtering.dedup import index as ix
    from filtering.errors import InputError
    from filtering.io.atomic import atomic_write_text
    from filtering.io.paths import is_local, join, local_path
    from filtering.writers.commit import MANIFEST, file_records, verify
    from pipelines.lock import output_lock

    if not is_local(out_dir):
        raise InputError(f"{out_dir}: poolsift index writes into local output folders only")
    root = local_path(out_dir)
    manifest_path = os.path.join(root, MANIFEST)
    if not os.path.exists(manifest_path):
        raise InputError(f"{out_dir}: no {MANIFEST} (not a poolsift output folder)")
    with output_lock(out_dir):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        folder = os.path.join(root, ix.INDEX)
        if os.path.exists(os.path.join(folder, ix.META)):
            with open(os.path.join(folder, ix.META), encoding="utf-8") as f:
                return folder, int(json.load(f)["rows"]), False
        verify(out_dir, manifest)  # the subset parts are the run's
        staged = os.path.join(root, ".poolsift-index-next")
        shutil.rmtree(staged, ignore_errors=True)
        try:
            rows = ix.build_from_output(out_dir, staged)
        except FileNotFoundError as e:
            raise InputError(str(e)) from e
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staged, folder)
        names = sorted(os.listdir(folder))
        if isinstance(manifest.get("files"), dict):
            manifest["files"].update(file_records(root, [os.path.join(folder, n) for n in names]))
            manifest["files"] = dict(sorted(manifest["files"].items()))
        manifest.setdefault("outputs", {})["index"] = join(out_dir, ix.INDEX, ix.META)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return folder, rows, True
