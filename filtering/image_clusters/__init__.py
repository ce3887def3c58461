"""Image clusters: DataComp's image-based baseline (Gadre et al. 2023, §3.4), configured
by the run's ``clusters:`` section and applied by the ``image_clusters`` filter.

- :mod:`filtering.image_clusters.image_clusters_stage`: ``ImageClustersStage`` trains or
  loads the centroids, embeds the reference (ImageNet) set, finds the target clusters and
  assigns every row (``cluster_id``, ``cluster_sim``, ``cluster_target``), all cached;
- :mod:`filtering.image_clusters.image_clusters_filter`: the ``image_clusters`` filter,
  which keeps ``cluster_target``.

The k-means and nearest-centroid machinery is generic and shared with semantic dedup and
decontamination: :mod:`filtering.clustering`.
"""
