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
