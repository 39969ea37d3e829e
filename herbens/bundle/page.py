"""A self-contained HTML page of predictions: one card per image, filters by decision.

Thumbnails are embedded as JPEG data URIs and the style and filter script are inline, so the
page opens anywhere (no network, no files beside it).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write
from herbens.data.dataset import load_rgb

THUMB = 180  # long edge of the thumbnails in pixels

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;background:#f6f5f0;color:#222}
.bar{margin:.5em 0 1em} .bar label{margin-right:1.2em}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ccc;border-radius:6px;padding:8px;width:300px}
.card img{max-width:100%;max-height:180px;display:block;margin:auto}
.path{font-size:11px;color:#666;word-break:break-all}
.decision{font-weight:bold;padding:1px 6px;border-radius:4px;color:#fff}
.d-species{background:#2a7a2a}.d-genus{background:#b07a10}.d-family{background:#a05020}.d-unknown{background:#777}
.d-failed{background:#b02020} .name{font-size:16px;margin:4px 0} .reason{font-size:12px;color:#444}
.cid{font-size:11px;color:#666} .enrolled{font-size:11px;background:#dde8ff;border-radius:3px;padding:0 3px}
.thresholds{font-size:13px;color:#444}
.sp{font-size:13px;margin:3px 0}.sp i{font-style:italic}
.pbar{background:#e4e4e4;height:6px;border-radius:3px}.pbar div{background:#3b6fb6;height:6px;border-radius:3px}
"""

_SCRIPT = """
function applyFilters(){
  var unknownOnly=document.getElementById('f-unknown').checked;
  var genusOnly=document.getElementById('f-genus').checked;
  var cards=document.querySelectorAll('.card');
  for(var i=0;i<cards.length;i++){
    var d=cards[i].getAttribute('data-decision');
    var show=(!unknownOnly&&!genusOnly)||(unknownOnly&&d==='unknown')||(genusOnly&&d==='genus');
    cards[i].style.display=show?'':'none';
  }
}
"""


def thumbnail_uri(path: str) -> str:
    """A small JPEG of the image as a data URI (empty when it cannot be read again)."""

    try:
        image = load_rgb(path, decode_size=(THUMB, THUMB))
    except HerbensError:
        return ""
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _species_line(sp: dict) -> str:
    e = html.escape
    enrolled = ' <span class="enrolled">enrolled</span>' if sp.get("enrolled") else ""
    return (f'<div class="sp"><i>{e(sp["scientific_name"])}</i> {e(sp["authors"])}{enrolled} '
            f'<span class="cid">category_id {sp["category_id"]}</span> {100 * sp["probability"]:.1f} %'
            f'<div class="pbar"><div style="width:{100 * sp["probability"]:.1f}%"></div></div></div>')


def card(item: dict) -> str:
    """One image's card: thumbnail, the decided name as headline with its rank and reason, then
    the top-k species with probability bars and the best genus and family."""
    e = html.escape
    uri = thumbnail_uri(item["path"])
    image = f'<img alt="{e(Path(item["path"]).name)}" src="{uri}">' if uri else ""
    headline = e(item["name"]) if item["rank"] in ("family", "unknown") else f'<i>{e(item["name"])}</i>'
    return (f'<div class="card" data-decision="{e(item["decision"])}">{image}'
            f'<div class="path">{e(item["path"])}</div>'
            f'<h2 class="name">{headline}</h2>'
            f'<p><span class="decision d-{e(item["decision"])}">{e(item["rank"])}</span> '
            f'<span class="reason">{e(item["reason"])}</span></p>'
            f'<p>genus <i>{e(item["genus"])}</i> {100 * item["genus_probability"]:.1f} %, '
            f'family {e(item["family"])} {100 * item["family_probability"]:.1f} %</p>'
            f'{"".join(_species_line(sp) for sp in item["species"])}</div>')


def failure_card(path: str, error: str) -> str:
    """The card of a file that could not be predicted: its path and the error."""
    e = html.escape
    return (f'<div class="card" data-decision="failed"><div class="path">{e(path)}</div>'
            f'<h2 class="name">not predicted</h2><p><span class="decision d-failed">failed</span> '
            f'<span class="reason">{e(error)}</span></p></div>')


def thresholds_line(bundle) -> str:
    """The thresholds the decisions compared, as one sentence."""
    values = bundle.thresholds
    levels = ", ".join(f"{lv} {100 * values[lv]:.1f} %" if values[lv] != float("inf") else f"{lv} never"
                       for lv in ("species", "genus", "family"))
    target = bundle.record["thresholds"].get("target_precision", 0.95)
    ood = (f"the embedding distance (knn) is above {-values['ood']:.4g}" if bundle.ood_score == "knn"
           else f"the OOD score ({bundle.ood_score}) is below {values['ood']:.4g}")
    return f"Thresholds ({100 * target:.0f} % precision on validation): {levels}; unknown when {ood}."


def render_page(items: list[dict], title: str, failures: list[tuple[str, str]] = (), thresholds: str = "",
                counts: dict | None = None, note: str = "") -> str:
    """The whole HTML document; the summary counts every file, the failed ones included.

    ``counts`` (decision -> number, ``failed`` included) when the page shows a sample of a larger
    run, and ``note`` saying what it left out (:class:`herbens.bundle.merge.PageSample`).
    """
    if counts is None:
        counts = {}
        for item in items:
            counts[item["decision"]] = counts.get(item["decision"], 0) + 1
        if failures:
            counts["failed"] = len(failures)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    cards = "".join(card(item) for item in items) + "".join(failure_card(p, err) for p, err in failures)
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{sum(counts.values())} files: {html.escape(summary)}</p>"
            + (f'<p class="note">{html.escape(note)}</p>' if note else "") +
            f'<p class="thresholds">{html.escape(thresholds)}</p>'
            '<div class="bar"><label><input type="checkbox" id="f-unknown" onchange="applyFilters()"> unknown only</label>'
            '<label><input type="checkbox" id="f-genus" onchange="applyFilters()"> genus only</label></div>'
            f'<div class="cards">{cards}</div></body></html>\n')


def write_page(path: Path, items: list[dict], bundle, failures: list[tuple[str, str]] = (),
               counts: dict | None = None, note: str = "") -> None:
    """Write the page atomically (``counts`` and ``note``: see :func:`render_page`)."""
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(render_page(items, f"herbens predictions ({bundle.path.name})", failures,
                                 thresholds_line(bundle), counts, note))
