"""Deduplication algorithms: exact groups, Hamming-radius search over perceptual hashes,
SemDeDup over embeddings, and survivor selection. Filters in ``filtering/filters/dedup.py``
and ``filtering/filters/decontaminate.py`` wire them to pool columns."""
