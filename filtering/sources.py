"""What depends on the input kind, stated once per kind: filters take their defaults from
it at config time, scorers their embedding sizes, the runner its writer settings and model
record, and the manifest carries it (``source``) for the report.

It lives here, below every stage, scorer and filter, so that any of them can ask about an
input kind without importing the source stage that reads it (the stages set ``info`` from
these records)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SourceInfo:
    """One input kind's record (see the module docstring)."""

    kind: str  # "webdataset" | "datacomp"
    score_field: str  # the CLIP score column clip_score and dedup's highest_clip_score read by default
    caption_column: str  # the caption's column in the source's own files (DataComp: text)
    images: bool  # whether the input holds images (resharding, the report's thumbnails)
    hex_columns: tuple[str, ...] = ()  # columns stored as hex like the uid (DataComp's key)
    default_embedding: str | None = None  # the embedding kind read when a filter names none
    embedding_dims: dict[str, int] = field(default_factory=dict)  # sizes known before reading (else from the model)
    scores_in_inputs: bool = False  # scores are read from the input files (DataComp) rather than scored
    model: dict[str, Any] | None = None  # a fixed model record (no model runs); None: the run's CLIP model

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v
            for k, v in self.__dict__.items()
        }


WEBDATASET = SourceInfo(
    kind="webdataset", score_field="clip_score", caption_column="caption", images=True, default_embedding="image"
)

DATACOMP = SourceInfo(
    kind="datacomp",
    score_field="clip_l14_similarity_score",
    caption_column="text",
    images=False,
    hex_columns=("key",),  # DataComp's key is its uid: hex, so stored like the uid
    default_embedding="l14_img",
    scores_in_inputs=True,
    # the npz arrays: OpenAI CLIP ViT-B/32 and ViT-L/14 embeddings (Gadre et al. 2023)
    embedding_dims={"b32_img": 512, "b32_txt": 512, "l14_img": 768, "l14_txt": 768},
    model={
        "arch": None,
        "pretrained": None,
        "checkpoint_sha256": None,
        "note": "scores and embeddings from DataComp metadata",
    },
)


def source_info(kind: str) -> SourceInfo:
    """The :class:`SourceInfo` of input ``kind`` (any kind but ``datacomp`` is WebDataset)."""
    return DATACOMP if kind == "datacomp" else WEBDATASET
