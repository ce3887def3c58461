"""Decontamination: drop pool samples that are near duplicates of an evaluation set.

DataComp (Gadre et al. 2023, §3.2 and App. F) removed pool images that are near
duplicates of its evaluation images, so that no evaluation image leaks into training.
Here the evaluation set (``reference``: an image folder, WebDataset shards, or a
``.npy``/``.pt`` of embeddings, a ``.npy`` of uint64 perceptual hashes, or, perceptual,
an earlier poolsift output, whose kept rows' hashes its index holds) is compared
with every pool row by :class:`filtering.decontaminate.decontaminate_stage.DecontaminateStage`, which
adds two columns per reference (Score/Filter split):

- ``method: semantic``: ``decontam_<name>_similarity``, the largest cosine similarity of
  the row's image embedding to any reference embedding; dropped when ``>= threshold``;
- ``method: perceptual``: ``decontam_<name>_distance``, the smallest Hamming distance of
  the row's ``phash`` to any reference hash; dropped when ``<= max_distance``;

and ``decontam_<name>_match``, the id of that nearest reference item (its file path
relative to the folder, its shard key, ``<file>:<row>``, or an earlier output's uid), recorded as the dropped
row's ``duplicate_of``. ``<name>`` defaults to the reference's base name.
"""

from __future__ import annotations

import posixpath
import re
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from filtering.filters.base import Decision, Filter, Params, register
from filtering.pool import Pool

METHOD_KEYS = {"semantic": ("threshold", "embedding"), "perceptual": ("max_distance",)}
COMMON_KEYS = ("reference", "method", "name")


class DecontaminateParams(Params):
    path_fields: ClassVar[tuple[str, ...]] = ("reference",)  # local paths: resolved against the config's folder
    reference: str
    method: Literal["semantic", "perceptual"] = "semantic"
    threshold: float = Field(default=0.95, gt=0, le=1)
    max_distance: int = Field(default=6, ge=0, le=32)
    embedding: str | None = None  # datacomp_metadata input: npz array, e.g. l14_img
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]+$")

    @model_validator(mode="after")
    def _method_keys(self) -> DecontaminateParams:
        allowed = set(COMMON_KEYS) | set(METHOD_KEYS[self.method])
        wrong = sorted(self.model_fields_set - allowed)
        if wrong:
            owner = next(m for m in METHOD_KEYS if wrong[0] in METHOD_KEYS[m])
            raise ValueError(
                f"{wrong[0]} applies to method {owner}, not {self.method}; "
                f"method {self.method} takes: {', '.join(sorted(allowed - {'method'}))}"
            )
        return self


def reference_slug(reference: str) -> str:
    """A column-safe short name for a reference path: its base name without extension."""
    base = posixpath.basename(reference.rstrip("/")) or "reference"
    base = re.sub(r"\{.*?\}", "", base)  # brace ranges of shard patterns
    base = base.split(".")[0]
    return re.sub(r"[^A-Za-z0-9]+", "_", base).strip("_").lower() or "reference"


@register
class Decontaminate(Filter):
    name = "decontaminate"
    Params = DecontaminateParams

    @property
    def tag(self) -> str:
        return self.params.name or reference_slug(self.params.reference)

    @property
    def value_column(self) -> str:
        suffix = "similarity" if self.params.method == "semantic" else "distance"
        return f"decontam_{self.tag}_{suffix}"

    @property
    def match_column(self) -> str:
        return f"decontam_{self.tag}_match"

    def requires(self) -> set[str]:
        cols = {self.value_column, self.match_column}
        return cols | {"phash"} if self.params.method == "perceptual" else cols

    def embeddings_required(self) -> set[str | None]:
        return {self.params.embedding} if self.params.method == "semantic" else set()

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        p = self.params
        values = pool.table.column(self.value_column)
        present = values.is_valid().to_numpy(zero_copy_only=False)
        v = values.fill_null(-1 if p.method == "semantic" else 65).to_numpy()
        hit = (v >= p.threshold) if p.method == "semantic" else (v <= p.max_distance)
        hit &= present
        duplicate_of = np.full(pool.n, None, dtype=object)
        duplicate_of[hit] = pool.column(self.match_column)[hit]
        return Decision(~hit, f"contaminated_{p.method}", duplicate_of)
