"""The typed settings the library's stages take: the sections of the run config that a
stage reads (``model``, ``clusters``, ``input.uid``), defined here so that a stage takes
its own section, never the application's whole config (``pipelines/config.py`` builds
its ``Config`` from these). Unknown keys are rejected at load time."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class UidConfig(Strict):
    """Where each sample's uid comes from (docs/spec.md, "Semantics that must match DataComp exactly"): never replaced silently."""

    source: Literal["json", "derive"] = "json"  # the .json field, or derived from `derive` for every sample
    field: str = Field(default="uid", min_length=1)  # the .json field (and img2dataset parquet column)
    derive: Literal["key", "url"] = "key"  # key: sha256(shard name NUL key); url: sha256(url); first 128 bits
    on_invalid: Literal["error", "derive", "fail"] = (
        "error"  # a missing or malformed json uid: exit 2 | derive, counted | fail the sample
    )
    duplicates: Literal["report", "keep_first", "error"] = (
        "report"  # a uid on two samples: warn | drop later copies | exit 1
    )


class ModelConfig(Strict):
    arch: str = "ViT-B-32"
    pretrained: str | None = "openai"
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    batch_size: PositiveInt = 256
    num_workers: int | None = Field(default=None, ge=0)  # decode processes; None = from CPU count
    # Opt-in: large JPEGs decoded DCT-downscaled, faster but not the model's own pixels (docs/config.md, model;
    # docs/performance.md).
    jpeg_draft: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError("must be one of auto | cpu | cuda | cuda:N")
        return device


class ClustersConfig(Strict):
    num_clusters: PositiveInt = 100_000
    reference: str | None = None
    embedding: str | None = None  # datacomp_metadata input: npz array, e.g. l14_img
    centroids: str | None = None  # .npy or DataComp's torch-saved .pt centroids instead of training
    sample_fraction: float | None = Field(default=None, gt=0, le=1)
    max_training_points: PositiveInt | None = None
    niter: PositiveInt = 20
    seed: int = 0
