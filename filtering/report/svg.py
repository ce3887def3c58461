"""Inline SVG plots: funnel bars, a stacked score histogram, cluster sizes, a sweep curve.

Plain SVG strings with <title> tooltips: no script, no external font or stylesheet, so
the report renders the same offline in any browser.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

KEPT = "#2f8f5b"
DROPPED = "#c9cdd3"
FAILED = "#d4634c"
ACCENT = "#3465a4"
INK = "#2b2f36"


def _fmt(n: float) -> str:
    return f"{int(n):,}" if float(n).is_integer() else f"{n:,.3g}"


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 1)]


def value_ticks(peak: float, n: int = 4) -> list[float]:
    """Ticks from 0 whose last one is at or above ``peak`` (the axis top); whole numbers (row counts)."""
    if peak <= n:
        return list(range(math.ceil(peak) + 1))
    ticks = nice_ticks(0, peak, n)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else max(peak, 1)
    while ticks[-1] < peak:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _svg(width: int, height: int, body: str, label: str, cls: str) -> str:
    return (
        f'<svg class="plot {cls}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">{body}</svg>'
    )


def funnel(stages: list[tuple[str, int, int, str]], total: int, width: int = 900) -> str:
    """Horizontal bars, one per stage: (label, rows left after it, rows removed by it, detail)."""
    row_h, label_w, pad = 34, 230, 8
    bar_w = width - label_w - 170
    height = pad * 2 + row_h * len(stages)
    parts = []
    for i, (label, left, removed, detail) in enumerate(stages):
        y = pad + i * row_h
        w_left = bar_w * left / total if total else 0
        w_rem = bar_w * removed / total if total else 0
        colour = KEPT if i == len(stages) - 1 else ACCENT
        tip = escape(
            f"{label}: {left:,} left"
            + (f", {removed:,} removed" if removed else "")
            + (f" ({detail})" if detail else "")
        )
        parts.append(f'<g class="funnel-row"><title>{tip}</title>')
        parts.append(f'<text x="{label_w - 10}" y="{y + 21}" text-anchor="end" class="lbl">{escape(label)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y + 5}" width="{w_left:.1f}" height="{row_h - 10}" rx="3" fill="{colour}"/>'
        )
        if removed:
            parts.append(
                f'<rect x="{label_w + w_left:.1f}" y="{y + 5}" width="{max(w_rem, 1.5):.1f}" height="{row_h - 10}" '
                f'rx="3" fill="{FAILED if label == "failed" else DROPPED}" opacity="0.85"/>'
            )
        pct = 100.0 * left / total if total else 0.0
        text = f"{left:,}  ({pct:.1f}%)" + (f"   −{removed:,}" if removed else "")
        if label == "failed":  # the row is about failures: "20,000 (100.0%)" there read as "all failed"
            text = f"{removed:,} failed  ({100.0 * removed / total:.1f}%)" if removed else "none failed"
        parts.append(f'<text x="{label_w + w_left + w_rem + 8:.1f}" y="{y + 21}" class="val">{text}</text></g>')
    return _svg(width, height, "".join(parts), "funnel", "funnel")


def histogram(
    edges: np.ndarray,
    kept: np.ndarray,
    dropped: np.ndarray,
    thresholds: list[float],
    xlabel: str,
    width: int = 900,
    height: int = 300,
) -> str:
    """Stacked bars (kept below, dropped above) with dashed threshold lines."""
    ml, mr, mt, mb = 64, 20, 28, 46
    pw, ph = width - ml - mr, height - mt - mb
    lo, hi = float(edges[0]), float(edges[-1])
    peak = max(int((kept + dropped).max()), 1)
    yt = value_ticks(peak)
    ymax = yt[-1]

    def sx(v: float) -> float:
        return ml + pw * (v - lo) / (hi - lo or 1)

    def sy(v: float) -> float:
        return mt + ph * (1 - v / ymax)

    parts = [f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" class="axis"/>']
    for t in yt:
        parts.append(f'<line x1="{ml}" y1="{sy(t):.1f}" x2="{ml + pw}" y2="{sy(t):.1f}" class="grid"/>')
        parts.append(f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    for t in nice_ticks(lo, hi, 8):
        parts.append(f'<text x="{sx(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tick">{t:g}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle" class="lbl">{escape(xlabel)}</text>')
    parts.append(
        f'<text x="14" y="{mt + ph / 2}" transform="rotate(-90 14 {mt + ph / 2})" text-anchor="middle" class="lbl">rows</text>'
    )
    for i in range(len(kept)):
        x0, x1 = sx(edges[i]), sx(edges[i + 1])
        w = max(x1 - x0 - 1, 0.8)
        k, d = int(kept[i]), int(dropped[i])
        if not k and not d:
            continue
        tip = escape(f"{edges[i]:.3f} – {edges[i + 1]:.3f}: {k:,} kept, {d:,} dropped")
        parts.append(f'<g class="bin"><title>{tip}</title>')
        if k:
            parts.append(
                f'<rect class="kept" x="{x0:.1f}" y="{sy(k):.1f}" width="{w:.1f}" height="{mt + ph - sy(k):.1f}" fill="{KEPT}"/>'
            )
        if d:
            parts.append(
                f'<rect class="dropped" x="{x0:.1f}" y="{sy(k + d):.1f}" width="{w:.1f}" height="{sy(k) - sy(k + d):.1f}" fill="{DROPPED}"/>'
            )
        parts.append("</g>")
    for t in thresholds:
        x = sx(t)
        parts.append(
            f'<line class="threshold" x1="{x:.1f}" y1="{mt - 14}" x2="{x:.1f}" y2="{mt + ph}" stroke="{INK}" '
            f'stroke-width="2" stroke-dasharray="6 4"><title>threshold {t:.4f}</title></line>'
        )
        right = x > ml + pw * 0.8  # near the right edge: label on the left of the line
        parts.append(
            f'<text x="{x - 6 if right else x + 6:.1f}" y="{mt - 6}" text-anchor="{"end" if right else "start"}" '
            f'class="lbl">threshold {t:.4f}</text>'
        )
    legend_x, legend_y = ml + pw - 130, height - 19  # bottom right, clear of bars and threshold labels
    parts.append(
        f'<rect x="{legend_x}" y="{legend_y}" width="12" height="12" fill="{KEPT}"/>'
        f'<text x="{legend_x + 17}" y="{legend_y + 10}" class="tick">kept</text>'
        f'<rect x="{legend_x + 60}" y="{legend_y}" width="12" height="12" fill="{DROPPED}"/>'
        f'<text x="{legend_x + 77}" y="{legend_y + 10}" class="tick">dropped</text>'
    )
    return _svg(width, height, "".join(parts), f"histogram of {xlabel}", "histogram")


def bars(values: list[tuple[str, int, bool]], ylabel: str, width: int = 900, height: int = 240) -> str:
    """Vertical bars, highlighted where the flag is set (cluster sizes: target clusters)."""
    ml, mr, mt, mb = 64, 20, 16, 40
    pw, ph = width - ml - mr, height - mt - mb
    peak = max((v for _, v, _ in values), default=1) or 1
    yt = value_ticks(peak)
    ymax = yt[-1]
    bw = pw / max(len(values), 1)
    parts = [f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" class="axis"/>']
    for t in yt:
        y = mt + ph * (1 - t / ymax)
        parts.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    for i, (label, v, flag) in enumerate(values):
        h = ph * v / ymax
        x = ml + i * bw
        parts.append(
            f'<rect class="bar" x="{x + 0.5:.1f}" y="{mt + ph - h:.1f}" width="{max(bw - 1, 0.8):.1f}" height="{h:.1f}" '
            f'fill="{KEPT if flag else DROPPED}"><title>{escape(label)}: {v:,}</title></rect>'
        )
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 10}" text-anchor="middle" class="lbl">{escape(ylabel)}</text>')
    return _svg(width, height, "".join(parts), ylabel, "bars")


def curve(
    xs: list[float],
    ys: list[int],
    xlabel: str,
    ylabel: str,
    mark: float | None = None,
    width: int = 900,
    height: int = 280,
) -> str:
    """A line with labelled points (sweep: subset size per parameter value); ``mark``: this run's value,
    a dashed line labelled above the plot area, where no point's value label reaches."""
    ml, mr, mt, mb = 80, 30, 34, 46
    pw, ph = width - ml - mr, height - mt - mb
    lo, hi = min(xs), max(xs)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    yt = value_ticks(max(ys) or 1)
    ymax = yt[-1]

    def sx(v: float) -> float:
        return ml + pw * (v - lo) / (hi - lo)

    def sy(v: float) -> float:
        return mt + ph * (1 - v / ymax)

    parts = [f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" class="axis"/>']
    for t in yt:
        parts.append(f'<line x1="{ml}" y1="{sy(t):.1f}" x2="{ml + pw}" y2="{sy(t):.1f}" class="grid"/>')
        parts.append(f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    if mark is not None and lo <= mark <= hi:
        parts.append(
            f'<line class="current" x1="{sx(mark):.1f}" y1="{mt}" x2="{sx(mark):.1f}" y2="{mt + ph}" stroke="{INK}" '
            f'stroke-dasharray="5 4"/><text x="{min(max(sx(mark), ml + 45), width - 45):.1f}" y="{mt - 22}" '
            'text-anchor="middle" class="tick">'
            f"this run: {mark:g}</text>"
        )
    pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
    parts.append(f'<polyline class="sweep-line" points="{pts}" fill="none" stroke="{ACCENT}" stroke-width="2.5"/>')
    for x, y in zip(xs, ys, strict=True):
        parts.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{ACCENT}"><title>{x:g}: {y:,} kept</title></circle>'
        )
        parts.append(f'<text x="{sx(x):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tick">{x:g}</text>')
        parts.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 8:.1f}" class="tick">{y:,}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle" class="lbl">{escape(xlabel)}</text>')
    parts.append(
        f'<text x="16" y="{mt + ph / 2}" transform="rotate(-90 16 {mt + ph / 2})" text-anchor="middle" class="lbl">{escape(ylabel)}</text>'
    )
    return _svg(width, height, "".join(parts), "sweep", "sweep")
