"""poolsift's library: shard reading, CLIP models, scorers, filters, dedup, writers, provenance.

Orchestration (config, stage graph, executors, CLI) lives in :mod:`pipelines`.
"""

__version__ = "0.1.0"
