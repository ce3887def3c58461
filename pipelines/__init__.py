"""Orchestration: config schema, stage graph, executors (local, Ray) and the ``poolsift`` CLI."""
