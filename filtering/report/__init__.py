"""The visual report of an output directory: ``poolsift report DIR`` -> ``DIR/report.html``.

One self-contained HTML file: the funnel, the score histogram with its thresholds,
thumbnail grids around the threshold, failures, clusters, duplicate groups, a sweep
curve when ``sweep.json`` exists, and provenance. Built in bounded memory from the
output directory alone (see :mod:`filtering.report.data`).
"""

from __future__ import annotations

from filtering.io.atomic import atomic_write_text
from filtering.io.paths import join
from filtering.report.data import ReportData, gather_outputs, kept_uids
from filtering.report.html import render
from filtering.report.score_columns import gather_score_columns
from filtering.report.thumbs import fill_thumbnails, run_formats

__all__ = ["ReportData", "build_report", "gather", "render", "write_report"]


def gather(out_dir: str, seed: int = 0, per_grid: int = 12) -> ReportData:
    """Collect the report's numbers and thumbnail candidates (images are filled later):
    the outputs' (:func:`filtering.report.data.gather_outputs`), then every score column a
    score filter used (aesthetic, NSFW, watermark heads...)."""
    data = gather_outputs(out_dir, per_grid=per_grid, seed=seed)
    data.score_columns = gather_score_columns(out_dir, data.manifest, kept_uids(out_dir), per_grid)
    return data


def build_report(out_dir: str, seed: int = 0, thumbnails: bool = True, log=None, shown_as: str | None = None) -> str:
    """The report of ``out_dir`` as an HTML string; ``shown_as``: the folder it names (a
    run's staged result is drawn before it is switched into place, writers/commit.py)."""
    data = gather(out_dir, seed=seed)
    if shown_as is not None:
        data.out_dir = shown_as
    if thumbnails:
        fill_thumbnails(data.samples(), log=log, formats=run_formats(data.manifest))
    return render(data)


def write_report(out_dir: str, output: str | None = None, seed: int = 0, log=None, shown_as: str | None = None) -> str:
    """Write the report (default ``DIR/report.html``) atomically; returns its path."""
    path = output or join(out_dir, "report.html")
    atomic_write_text(path, build_report(out_dir, seed=seed, log=log, shown_as=shown_as))
    return path
