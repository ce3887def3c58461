"""Deduplication in one package: the ``dedup`` filter (:mod:`filtering.dedup.dedup_filter`,
registered by :mod:`filtering.registry`), exact groups and survivor selection
(:mod:`filtering.dedup.groups`), Hamming-radius search over perceptual hashes
(:mod:`filtering.dedup.hamming`) and SemDeDup over embeddings (:mod:`filtering.dedup.semantic`).
The decontamination stage reuses ``hamming.nearest`` and ``dedup_filter.hash_column``."""
