"""Decontamination: pool samples that are near duplicates of an evaluation set.

- :mod:`filtering.decontaminate.decontaminate_stage`: ``DecontaminateStage`` loads each
  reference set (cached) and adds, per reference, the nearest reference item's
  similarity or Hamming distance and its id (``decontam_<name>_*``);
- :mod:`filtering.decontaminate.decontaminate_filter`: the ``decontaminate`` filter,
  which thresholds those columns.
"""
