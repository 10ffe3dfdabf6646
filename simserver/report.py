"""A self-contained HTML evaluation report: summary, per-class bar chart, Recall@K plot, and a
gallery of the worst hold-out queries with their top 5. Inline SVG and base64 thumbnails, so the
file can be mailed or attached to a ticket as is."""

from __future__ import annotations

import base64
import html
import io

from PIL import Image

from simserver.evaluation import CURVE_KS, RetrievalResult, worst_order
from simserver.ingest import Sample

COLORS = {"pretrained": "#8c8c8c", "finetuned": "#1f77b4"}


def _thumb(sample: Sample, size: int = 96) -> str:
    img = Image.fromarray(sample.pixels)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _bar_chart(results: dict[str, RetrievalResult]) -> str:
    classes = sorted(next(iter(results.values())).per_class_recall_at_1)
    row, bar, left, width = 18, 7, 170, 360
    height = row * len(classes) + 30
    parts = [
        f'<svg width="{left + width + 60}" height="{height}" role="img" aria-label="per-class Recall@1">'
    ]
    for i, c in enumerate(classes):
        y = 10 + i * row
        parts.append(
            f'<text x="{left - 6}" y="{y + 11}" text-anchor="end" font-size="11">{html.escape(c)}</text>'
        )
        for j, (name, res) in enumerate(results.items()):
            v = res.per_class_recall_at_1.get(c, 0.0)
            parts.append(
                f'<rect x="{left}" y="{y + j * bar}" width="{v * width:.1f}" height="{bar - 1}" '
                f'fill="{COLORS.get(name, "#d62728")}"><title>{html.escape(c)} {name}: {v:.2f}</title></rect>'
            )
    for t in (0, 0.5, 1):
        x = left + t * width
        parts.append(f'<line x1="{x}" x2="{x}" y1="5" y2="{height - 20}" stroke="#ddd"/>')
        parts.append(f'<text x="{x}" y="{height - 6}" font-size="10" text-anchor="middle">{t:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _curve(results: dict[str, RetrievalResult]) -> str:
    w, h, pad = 420, 240, 36
    xs = {k: pad + (k - 1) * (w - 2 * pad) / (len(CURVE_KS) - 1) for k in CURVE_KS}

    def y(v: float) -> float:
        return h - pad - v * (h - 2 * pad)

    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="Recall@K">']
    for t in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y(t)}" y2="{y(t)}" stroke="#eee"/>')
        parts.append(f'<text x="{pad - 4}" y="{y(t) + 4}" font-size="10" text-anchor="end">{t:g}</text>')
    for k in CURVE_KS:
        parts.append(f'<text x="{xs[k]}" y="{h - pad + 14}" font-size="10" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 4}" font-size="11" text-anchor="middle">K</text>')
    for name, res in results.items():
        pts = " ".join(f"{xs[k]:.1f},{y(v):.1f}" for k, v in zip(CURVE_KS, res.recall_curve, strict=True))
        color = COLORS.get(name, "#d62728")
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _gallery(
    res: RetrievalResult, queries: list[Sample], gallery: list[Sample], n: int, thumbs: dict[int, str]
) -> str:
    worst = worst_order(res, [q.name for q in queries], n)
    rows = []
    for i in worst:
        q = queries[i]
        cells = [
            f'<figure class="q"><img src="{_thumb(q)}" alt=""><figcaption><b>{html.escape(q.label)}</b><br>'
            f"{html.escape(q.name)}<br>first match at rank {int(res.first_correct[i]) + 1}"
            "</figcaption></figure>"
        ]
        for j in res.top5[i]:
            g = gallery[int(j)]
            if int(j) not in thumbs:
                thumbs[int(j)] = _thumb(g)
            ok = "ok" if g.label == q.label else "bad"
            cells.append(
                f'<figure class="{ok}"><img src="{thumbs[int(j)]}" alt=""><figcaption>'
                f"{html.escape(g.label)}</figcaption></figure>"
            )
        rows.append(f'<div class="row">{"".join(cells)}</div>')
    return "".join(rows)


def render(
    title: str,
    results: dict[str, RetrievalResult],
    queries: list[Sample],
    gallery: list[Sample],
    summary: dict,
    worst: int = 12,
) -> str:
    """``results``: by embedding name (``pretrained``, ``finetuned``); the gallery of worst queries
    uses the last one (the fine-tuned embedding when there is one)."""
    table = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r.recall_at_1:.3f}</td><td>{r.recall_at_5:.3f}</td>"
        f"<td>{r.map_at_r:.3f}</td></tr>"
        for name, r in results.items()
    )
    legend = " ".join(
        f'<span style="color:{COLORS.get(n, "#d62728")}">&#9632; {html.escape(n)}</span>' for n in results
    )
    name, last = list(results.items())[-1]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; }}
.row {{ display: flex; gap: 6px; margin-bottom: 10px; }}
figure {{ margin: 0; width: 104px; font-size: 11px; text-align: center; }}
figure img {{ width: 96px; height: 96px; object-fit: contain; border: 4px solid transparent; }}
.q img {{ border-color: #555; }} .ok img {{ border-color: #2ca02c; }} .bad img {{ border-color: #d62728; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary.get("reason", ""))}</p>
<p>{summary.get("n", 0)} images: {len(queries)} hold-out queries against {len(gallery)} training images.</p>
<table><tr><th>embedding</th><th>Recall@1</th><th>Recall@5</th><th>mAP@R</th></tr>{table}</table>
<h2>Recall@1 per class</h2><p>{legend}</p>{_bar_chart(results)}
<h2>Recall@K</h2><p>{legend}</p>{_curve(results)}
<h2>Worst queries ({html.escape(name)})</h2>
<p>Query, then its top 5 in the training images: green = same label, red = another label.</p>
{_gallery(last, queries, gallery, worst, {})}
</body></html>
"""
