"""The report page: one self-contained HTML file (inline CSS and SVG, data: URI thumbnails)."""

from __future__ import annotations

import json
import re
from html import escape
from typing import Any

from filtering.report import svg
from filtering.report.data import ReportData, Sample, source_record

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f5f6f8;color:#2b2f36;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header{background:#1f2a37;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px;font-weight:600}
header .sub{color:#c7ced8;font-size:13px;margin-top:4px}
main{max-width:1000px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:8px;margin:18px 0;padding:16px 20px}
h2{font-size:17px;margin:0 0 10px;font-weight:600}
h3{font-size:14px;margin:16px 0 8px;color:#374151;font-weight:600}
.note{color:#6b7280;font-size:12.5px;margin:4px 0 10px}
.note.warn{color:#b4432e}
.kpis{display:flex;gap:14px;flex-wrap:wrap;margin:4px 0 12px}
.kpi{background:#f1f5f9;border-radius:6px;padding:8px 14px;min-width:130px}
.kpi b{display:block;font-size:19px}
.kpi span{font-size:12px;color:#6b7280}
svg.plot{display:block;max-width:100%;height:auto}
svg .lbl{font-size:13px;fill:#2b2f36}
svg .val{font-size:12.5px;fill:#374151}
svg .tick{font-size:11.5px;fill:#6b7280}
svg .axis{stroke:#9ca3af;stroke-width:1}
svg .grid{stroke:#eef0f3;stroke-width:1}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border-bottom:1px solid #eceef1;padding:4px 10px;text-align:left;vertical-align:top}
th{color:#4b5563;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.grid-cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(124px,1fr));gap:10px}
.card{background:#fafbfc;border:1px solid #e5e7eb;border-radius:6px;padding:6px;font-size:11.5px;overflow:hidden}
.card img,.card .noimg{display:block;width:112px;height:112px;object-fit:contain;margin:0 auto 4px;background:#eef0f3;border-radius:4px}
.card .noimg{display:flex;align-items:center;justify-content:center;color:#9ca3af;font-size:11px;text-align:center}
.card .cap{color:#374151;height:4.35em;overflow:hidden;word-break:break-word;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical}
.card .meta{color:#6b7280;margin-top:3px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.card .why{color:#6b7280;margin-top:3px;overflow-wrap:break-word}
.card .reason{color:#b4432e;margin-top:3px;overflow-wrap:break-word}
.card .score{font-weight:600;color:#1f2a37}
.card.kept{border-top:3px solid #2f8f5b}.card.dropped{border-top:3px solid #9ca3af}
.card.failed{border-top:3px solid #d4634c}.card.survivor{border-top:3px solid #2f8f5b}.card.duplicate{border-top:3px solid #9ca3af}
.dups{display:flex;flex-wrap:wrap;gap:12px}
.dup{display:flex;gap:8px;align-items:flex-start;padding:8px;border:1px dashed #d8dce2;border-radius:8px}
.dup .card{width:126px;flex:none}
.dup .arrow{align-self:center;color:#6b7280;font-size:20px}
pre{background:#f8fafc;border:1px solid #e5e7eb;border-radius:6px;padding:10px;font-size:12px;overflow:auto;max-height:320px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:middle}
"""


def _fmt_score(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


REASON_CHARS = 60  # about three lines of a card: longer reasons end at a word, in full in the tooltip


def shorten(text: str, limit: int) -> str:
    """``text`` cut at the last word boundary before ``limit`` characters, with "…"."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    head = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return head.rstrip(" ,;:(") + "…"


def card(s: Sample, cls: str, pictures: bool = True) -> str:
    """One thumbnail card; ``pictures=False`` (metadata-only input) leaves the image box out."""
    picture = (
        ""
        if not pictures
        else (
            f'<img src="{s.image}" alt="{escape(s.caption or s.key or s.uid or "")}" title="{escape(s.uid or "")}">'
            if s.image
            else f'<div class="noimg" title="{escape(s.uid or "")}">no image</div>'
        )
    )
    caption = escape(s.caption) if s.caption else "<i>(no caption)</i>"
    note, full = escape(shorten(s.note or "", REASON_CHARS)), escape(s.note or "")
    if cls == "failed":
        line = f'<div class="reason" title="{full}">{note}</div>'
    else:  # wraps between words: a nowrap line cut the note mid-word ("duplic…")
        line = f'<div class="why" title="{full}"><span class="score">{_fmt_score(s.score)}</span> · {note}</div>'
    return (
        f'<div class="card {cls}">{picture}<div class="cap" title="{escape(s.caption or "")}">{caption}</div>{line}'
        f'<div class="meta" title="{escape(str(s.source_shard))}">{escape(str(s.key or ""))}</div></div>'
    )


def cards(samples: list[Sample], cls: str, pictures: bool = True) -> str:
    if not samples:
        return '<p class="note">none</p>'
    return '<div class="grid-cards">' + "".join(card(s, cls, pictures) for s in samples) + "</div>"


def has_pictures(data: ReportData) -> bool:
    return bool(source_record(data.manifest)["images"])  # DataComp metadata: no images at all


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    th = "".join(f'<th class="{"num" if i in numeric else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"num" if i in numeric else ""}">{escape(_cell(v))}</td>' for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v: Any) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def section_funnel(data: ReportData) -> str:
    c = data.manifest.get("counts", {})
    total = int(c.get("input", 0))
    failed = int(c.get("failed", 0))
    stages = [("input", total, 0, "")]
    fr = c.get("failed_reasons", {}) or {}
    stages.append(("failed", total - failed, failed, ", ".join(f"{k} {v}" for k, v in fr.items())))
    for f in c.get("filters", []):
        why = ", ".join(f"{k} {v:,}" for k, v in (f.get("reasons") or {}).items())
        stages.append((f["name"], int(f["kept"]), int(f["dropped"]), why))
    kept = int(c.get("kept", 0))
    stages.append(("kept", kept, 0, ""))
    pct = 100.0 * kept / total if total else 0.0
    kpis = (
        '<div class="kpis">'
        + "".join(
            f'<div class="kpi"><b>{v}</b><span>{escape(k)}</span></div>'
            for k, v in [
                ("input rows", f"{total:,}"),
                ("failed to read", f"{failed:,}"),
                ("kept", f"{kept:,}"),
                ("kept share", f"{pct:.1f}%"),
            ]
        )
        + "</div>"
    )
    reason_rows = [[f["name"], r, n] for f in c.get("filters", []) for r, n in (f.get("reasons") or {}).items()]
    reason_rows += [["failed", r, n] for r, n in fr.items()]
    return (
        '<section id="funnel"><h2>Funnel</h2>'
        + kpis
        + svg.funnel(stages, total)
        + '<p class="note">Each bar is the rows left after that step; the grey tail is what the step removed '
        "(red: samples that could not be read or decoded). A list of filters is applied in order.</p>"
        + (
            "<h3>Drops and failures by reason</h3>" + _table(["step", "reason", "rows"], reason_rows, {2})
            if reason_rows
            else ""
        )
        + "</section>"
    )


def section_scores(data: ReportData) -> str:
    h = data.histogram
    out = ['<section id="scores"><h2>CLIP scores</h2>']
    if h is None:
        out.append('<p class="note">No scores available for this output (no score cache and no scored subset).</p>')
    else:
        scope = {"pool": "every scored row of the pool", "kept": "kept rows only"}.get(data.score_scope, "")
        thr = ", ".join(f"{t:.4f}" for t in h.thresholds) or "none"
        out.append(
            f'<p class="note">{escape(h.field)} over {scope}: {int(h.kept.sum() + h.dropped.sum()):,} rows, '
            f"{len(h.kept)} bins; threshold {thr}. Green: kept in the final subset; grey: dropped by any filter.</p>"
        )
        out.append(svg.histogram(h.edges, h.kept, h.dropped, h.thresholds, h.field))
    titles = {
        "highest-scored kept": ("kept", "the best of the subset"),
        "lowest-scored kept": ("kept", "just above the threshold: the weakest rows that made it"),
        "highest-scored dropped": ("dropped", "just below the threshold: the best rows the score removed"),
    }
    for name, rows in data.grids.items():
        cls, why = titles.get(name, ("kept", ""))
        out.append(
            f'<h3>{escape(name.capitalize())} <span class="note">— {escape(why)}</span></h3>'
            + cards(rows, cls, has_pictures(data))
        )
    out.append("</section>")
    return "".join(out)


def section_score_columns(data: ReportData) -> str:
    """One block per column a score filter used: histogram with thresholds, best and worst rows."""
    out = []
    for c in data.score_columns:
        by = f" (written by scorer {escape(c.scorer)})" if c.scorer else ""
        out.append(f'<section id="score-{escape(c.column)}"><h2>{escape(c.column)}</h2>')
        h = c.histogram
        if h is None:
            out.append(f'<p class="note">No values of {escape(c.column)} found{by}.</p></section>')
            continue
        scope = "every scored row of the pool" if c.scope == "pool" else "kept rows only"
        thr = ", ".join(f"{t:.4g}" for t in h.thresholds) or "none"
        out.append(
            f'<p class="note">{escape(c.column)}{by} over {scope}: {int(h.kept.sum() + h.dropped.sum()):,} rows; '
            f"threshold {thr}. Green: kept in the final subset; grey: dropped by any filter.</p>"
        )
        out.append(svg.histogram(h.edges, h.kept, h.dropped, h.thresholds, h.field))
        for title, rows in ((f"Highest {c.column}", c.best), (f"Lowest {c.column}", c.worst)):
            out.append(f"<h3>{escape(title)}</h3>" + cards(rows, "kept", has_pictures(data)))
        out.append("</section>")
    return "".join(out)


def section_failures(data: ReportData) -> str:
    failed = int(data.manifest.get("counts", {}).get("failed", 0))
    if not failed and not data.failures:
        return ""
    return (
        f'<section id="failures"><h2>Failures</h2><p class="note">A seeded random sample of {len(data.failures)} of the '
        f"{failed:,} samples that could not be read or decoded, with the reason.</p>"
        + cards(data.failures, "failed", has_pictures(data))
        + "</section>"
    )


def section_clusters(data: ReportData) -> str:
    cl = data.clusters
    if cl is None:
        return ""
    shown = cl.sizes[:120]
    scope = "over the whole pool" if cl.scope == "pool" else "over the kept subset"
    target = (
        f", {cl.n_target:,} of them target clusters (nearest to a reference embedding)"
        if cl.n_target is not None
        else ""
    )
    out = [
        f'<section id="clusters"><h2>Image clusters</h2><p class="note">{cl.n_clusters:,} clusters with rows {scope}{target}. '
        f'The {len(shown)} largest, by size; <span class="swatch" style="background:{svg.KEPT}"></span>kept (target) '
        f'<span class="swatch" style="background:{svg.DROPPED}"></span>not a target.</p>'
    ]
    out.append(
        svg.bars([(f"cluster {cid}", n, flag) for cid, n, flag in shown], "clusters, largest first (rows per cluster)")
    )
    for cid, rows in cl.examples.items():
        size = next((n for c, n, _ in cl.sizes if c == cid), 0)
        out.append(
            f'<h3>Cluster {cid} <span class="note">— {size:,} rows</span></h3>'
            + cards(rows, "kept", has_pictures(data))
        )
    out.append("</section>")
    return "".join(out)


def section_duplicates(data: ReportData) -> str:
    if not data.duplicates:
        return ""
    out = [
        f'<section id="duplicates"><h2>Duplicate groups</h2><p class="note">{data.duplicate_rows:,} rows were dropped '
        f"as duplicates. The {len(data.duplicates)} largest groups: the survivor (left) beside the copies it displaced.</p>"
        '<div class="dups">'
    ]
    for g in data.duplicates:
        more = g.total_copies - len(g.copies)
        tail = f'<div class="arrow note">+{more:,} more</div>' if more > 0 else ""
        out.append(
            '<div class="dup">'
            + card(g.survivor, "survivor", has_pictures(data))
            + '<div class="arrow" title="displaced">⟵</div>'
            + "".join(card(c, "duplicate", has_pictures(data)) for c in g.copies)
            + tail
            + "</div>"
        )
    out.append("</div></section>")
    return "".join(out)


def section_sweep(data: ReportData) -> str:
    sw = data.sweep
    if not sw or not sw.get("results"):
        return ""
    res = sw["results"]
    numeric = all(isinstance(r["value"], int | float) and not isinstance(r["value"], bool) for r in res)
    differs = sw.get("differs_from_run") or []
    out = [
        f'<section id="sweep"><h2>Sweep: {escape(str(sw.get("param")))}</h2>'
        '<p class="note">Subset size per value, from the cached scores (subsets not rewritten).</p>'
    ]
    if differs:
        out.append(
            "<p class=\"note warn\">This sweep's other settings differ from this run's, so its sizes are not this "
            "run's at any value: "
            + "; ".join(
                f"{escape(d['key'])}: sweep {escape(json.dumps(d['sweep']))}, run {escape(json.dumps(d['run']))}"
                for d in differs
            )
            + ".</p>"
        )
    if numeric and len(res) > 1:
        pts = sorted((float(r["value"]), int(r["kept"])) for r in res)
        current = None if differs else config_value(data.manifest.get("config", {}), str(sw.get("param")))
        mark = float(current) if isinstance(current, int | float) and not isinstance(current, bool) else None
        out.append(svg.curve([p[0] for p in pts], [p[1] for p in pts], str(sw.get("param")), "rows kept", mark))
    names = [f["name"] for f in res[0].get("filters", [])]
    rows = [
        [r["value"], r["kept"], f"{100.0 * r['kept'] / r['input']:.1f}%" if r.get("input") else ""]
        + [f["dropped"] for f in r.get("filters", [])]
        for r in res
    ]
    out.append(
        _table(
            ["value", "kept", "of input"] + [f"{n} dropped" for n in names],
            rows,
            {1, 2} | set(range(3, 3 + len(names))),
        )
    )
    out.append("</section>")
    return "".join(out)


def config_value(config: Any, key: str) -> Any:
    """The value at a ``--set`` style key path (``filters[0].clip_score.top_fraction``), or None."""
    node = config
    for name, index in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", key):
        try:
            node = node[int(index)] if index else node[name]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def section_provenance(data: ReportData) -> str:
    m = data.manifest
    model = m.get("model", {}) or {}
    loaded = model.get("arch") is not None  # DataComp metadata: scores come with the pool, no model runs
    inputs = m.get("inputs", []) or []
    rows = [[i.get("path"), i.get("size"), (i.get("sha256") or "")[:16]] for i in inputs[:20]]
    more = f'<p class="note">… and {len(inputs) - 20:,} more inputs (see manifest.json)</p>' if len(inputs) > 20 else ""
    facts = [
        ["poolsift", m.get("poolsift_version")],
        ["git commit", (m.get("git_commit") or "")[:12]],
        ["created", m.get("created_at")],
        ["input kind", m.get("input_kind")],
        ["config sha256", (m.get("config_sha256") or "")[:16]],
        ["model", f"{model.get('arch')} · {model.get('pretrained')}" if loaded else _no_model(model)],
        ["checkpoint sha256", (model.get("checkpoint_sha256") or "")[:16]] if loaded else None,
        ["input checksum", m.get("input_checksum")],
    ]
    facts = [f for f in facts if f is not None]
    config = dict(m.get("config", {}))
    if not loaded:  # the model section's defaults describe nothing this run loaded
        config.pop("model", None)
    return (
        '<section id="provenance"><h2>Provenance</h2>'
        + _table(["", ""], facts)
        + f"<h3>Inputs ({len(inputs):,})</h3>"
        + _table(["path", "bytes", "sha256"], rows, {1})
        + more
        + "<h3>Config</h3><pre>"
        + escape(json.dumps(config, indent=2))
        + "</pre>"
        + ("" if loaded else '<p class="note">No model ran, so the config\'s model section is left out.</p>')
        + "</section>"
    )


def _no_model(model: dict[str, Any]) -> str:
    return "none loaded" + (f" ({model['note']})" if model.get("note") else "")


def render(data: ReportData) -> str:
    m = data.manifest
    c = m.get("counts", {})
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in data.notes)
    body = "".join(
        [
            section_funnel(data),
            section_scores(data),
            section_score_columns(data),
            section_failures(data),
            section_clusters(data),
            section_duplicates(data),
            section_sweep(data),
            section_provenance(data),
        ]
    )
    sub = (
        f"{escape(str(data.out_dir))} · {int(c.get('input', 0)):,} rows in, {int(c.get('kept', 0)):,} kept · "
        f"{escape(str(m.get('created_at', '')))}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>poolsift report — {escape(str(data.out_dir))}</title><style>{CSS}</style></head><body>"
        f'<header><h1>poolsift report</h1><div class="sub">{sub}</div></header><main>{notes}{body}</main></body></html>\n'
    )
