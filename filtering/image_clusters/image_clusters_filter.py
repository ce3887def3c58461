"""Image-cluster filter (DataComp, Gadre et al. 2023, §3.4 "image-based" baseline).

Keeps the rows whose image falls in a target cluster: the k-means cluster (nearest
centroid by inner product) that is the nearest cluster of at least one reference
(ImageNet) embedding. The cluster stage computes ``cluster_target`` once, cached;
this filter only reads it. Composed after ``clip_score: {top_fraction: 0.3}`` it is
DataComp's ``image_based_intersect_clip_score`` (the CLIP-score threshold is computed
over the whole pool, so the order of the two does not matter).
"""

from __future__ import annotations

import numpy as np

from filtering.filters.base import Decision, Filter, Params, register
from filtering.pool import Pool


class ImageClustersParams(Params):
    """No parameters: the clusters and reference set are the run's ``clusters`` section."""


@register
class ImageClusters(Filter):
    name = "image_clusters"
    Params = ImageClustersParams

    def requires(self) -> set[str]:
        return {"cluster_target"}

    def apply(self, pool: Pool, alive: np.ndarray) -> Decision:
        keep = np.asarray(pool.column("cluster_target"), dtype=bool)
        return Decision(keep, "image_cluster_not_in_target")
