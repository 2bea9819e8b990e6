"""The evaluation's static HTML report (``index.html`` in the report folder), for readers without W&B.

One self-contained file: ``summary.md`` rendered (its tables, with the best values marked), every
figure of the folder embedded as a base64 data URI (``embedded_image``) (curve plots, then the qualitative panels per
method and domain), the full summary tables read back from their CSV files (so every column any part
of the pipeline adds shows up), and the configuration and run ids the report came from. A stage may
add sections of its own (``ReportSection``: e.g. the simulated clicks of interactive segmentation).
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml
from PIL import Image

HTML_REPORT = "index.html"
#: Figures larger than this are embedded as JPEG (``JPEG_QUALITY``) to keep the page small; the PNG
#: files stay in the folder.
JPEG_ABOVE_BYTES = 200_000
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ReportSection:
    """A section a stage adds to the evaluation report. ``title``: its heading; ``markdown``: its body
    (``reports.write_reports`` puts both into summary.md before the file list, so index.html renders
    them with the summary); ``figures``: report-relative PNG paths, linked from summary.md and embedded
    in index.html under the title; ``tables``: ``(CSV name, heading)`` pairs shown in full among
    index.html's tables; ``files``: every other report-relative file the section wrote (recorded with
    the report's files: its digest and its W&B artifact)."""

    title: str
    markdown: str
    figures: tuple[str, ...] = ()
    tables: tuple[tuple[str, str], ...] = ()
    files: tuple[str, ...] = ()

    @property
    def written(self) -> tuple[str, ...]:
        """Every report-relative file of the section: figures, tables and the other files."""
        return tuple(dict.fromkeys([*self.figures, *(name for name, _ in self.tables), *self.files]))


_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.5em 0 1em; }
.scroll { overflow-x: auto; }
"""


def figure_anchor(relative_path: str) -> str:
    """The HTML id of an embedded figure, from its path relative to the report folder."""
    return "figure-" + re.sub(r"[^A-Za-z0-9_-]", "-", relative_path)


def _inline(text: str, figures: set[str]) -> str:
    """Escaped markdown inline text with bold, code and links (links to embedded figures become anchors)."""
    def link(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        href = f"#{figure_anchor(target)}" if target in figures else target
        return f'<a href="{html.escape(href, quote=True)}">{label}</a>'

    escaped = html.escape(text, quote=False)
    escaped = _CODE.sub(r"<code>\1</code>", escaped)
    escaped = _BOLD.sub(r"<strong>\1</strong>", escaped)
    return _LINK.sub(link, escaped)


def markdown_to_html(markdown: str, figures: Iterable[str] = ()) -> str:
    """HTML of the markdown subset the reports write: ``#`` headings, pipe tables, ``-`` lists,
    paragraphs, and inline bold, code and links."""
    figures = set(figures)
    out: list[str] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].rstrip()
        if not line:
            index += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{_inline(line[level:].strip(), figures)}</h{level}>")
            index += 1
        elif line.startswith("|"):
            rows = []
            while index < len(lines) and lines[index].startswith("|"):
                rows.append([cell.strip() for cell in lines[index].strip().strip("|").split("|")])
                index += 1
            body = [row for row in rows[1:] if not all(set(cell) <= set("-:") for cell in row)]
            out.append('<div class="scroll"><table><thead><tr>'
                       + "".join(f"<th>{_inline(cell, figures)}</th>" for cell in rows[0]) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(cell, figures)}</td>" for cell in row) + "</tr>"
                                 for row in body)
                       + "</tbody></table></div>")
        elif line.startswith("- "):
            items = []
            while index < len(lines) and lines[index].startswith("- "):
                items.append(f"<li>{_inline(lines[index][2:], figures)}</li>")
                index += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            paragraph = []
            while index < len(lines) and lines[index].strip() and not lines[index].startswith(("#", "|", "- ")):
                paragraph.append(lines[index].strip())
                index += 1
            out.append(f"<p>{_inline(' '.join(paragraph), figures)}</p>")
    return "\n".join(out)


def embedded_image(path: Path) -> tuple[str, bytes]:
    """``(MIME type, bytes)`` of a PNG figure for embedding: the PNG itself, or, when it is larger
    than ``JPEG_ABOVE_BYTES`` (panels of textured photographs), the same pixels as a JPEG."""
    data = path.read_bytes()
    if len(data) <= JPEG_ABOVE_BYTES:
        return "image/png", data
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return ("image/jpeg", buffer.getvalue()) if buffer.tell() < len(data) else ("image/png", data)


def embedded_figure(folder: Path, relative_path: str, caption: str) -> str:
    """A ``<figure>`` with the image at ``folder / relative_path`` as a base64 data URI."""
    mime, data = embedded_image(folder / relative_path)
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure id="{figure_anchor(relative_path)}"><img alt="{html.escape(relative_path, quote=True)}" '
            f'src="data:{mime};base64,{encoded}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _csv_table(path: Path) -> str:
    if not path.is_file() or path.stat().st_size == 0:
        return "<p>(not written)</p>"
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return "<p>(empty)</p>"
    if frame.empty:
        return "<p>(empty)</p>"
    return '<div class="scroll">' + frame.to_html(index=False, na_rep="n/a", float_format=_float_text,
                                                  border=0) + "</div>"


def _float_text(value: float) -> str:
    text = f"{value:.4f}"
    return text[1:] if text == "-0.0000" else text


def _sample_domains(folder: Path) -> dict[str, str]:
    """``safe_id -> domain`` from ``per_mask.csv`` (empty when it is missing)."""
    try:
        rows = pd.read_csv(folder / "per_mask.csv", usecols=["safe_id", "group"], dtype=str)
    except (OSError, ValueError):
        return {}
    return dict(zip(rows["safe_id"], rows["group"]))


def qualitative_sections(folder: Path, qualitative_dir: str) -> list[str]:
    """Per method (a ``<h3>``) and domain (an ``<h4>``): that method's panels, embedded. A panel is
    ``<qualitative_dir>/<method>/<safe_id>_<prompt set>.png``; its domain comes from ``per_mask.csv``."""
    domains = _sample_domains(folder)
    out = []
    for method_dir in sorted(p for p in (folder / qualitative_dir).glob("*") if p.is_dir()):
        by_domain: dict[str, list[Path]] = {}
        for panel in sorted(method_dir.glob("*.png")):
            safe_id = panel.stem.rsplit("_", 1)[0]
            by_domain.setdefault(domains.get(safe_id, "unknown domain"), []).append(panel)
        if not by_domain:
            continue
        out.append(f"<h3>{html.escape(method_dir.name)}</h3>")
        for domain in sorted(by_domain):
            out.append(f"<h4>{html.escape(method_dir.name)}: {html.escape(domain)}</h4>")
            out += [embedded_figure(folder, panel.relative_to(folder).as_posix(), panel.stem)
                    for panel in by_domain[domain]]
    return out


def html_report(folder: Path, summary_markdown: str, tables: Iterable[tuple[str, str]], qualitative_dir: str,
                provenance: dict[str, Any], sections: Iterable[ReportSection] = ()) -> str:
    """The page (a string) from the files in ``folder``: ``summary_markdown`` (a file name) rendered,
    the top-level PNGs and the qualitative panels embedded, each ``(csv name, heading)`` of ``tables``
    in full, and ``provenance`` (e.g. ``{"run ids": ..., "config": ...}``) as YAML. ``sections``: each
    one's figures embedded under its title after the other figures (not among them), its tables after
    the others; its text is expected in the summary file."""
    folder = Path(folder)
    sections = list(sections)
    section_figures = [name for section in sections for name in section.figures]
    curve_figures = sorted(path.name for path in folder.glob("*.png") if path.name not in section_figures)
    panels = sorted(path.relative_to(folder).as_posix() for path in folder.glob(f"{qualitative_dir}/*/*.png"))
    summary_path = folder / summary_markdown
    summary = summary_path.read_text(encoding="utf-8") if summary_path.is_file() else "# Uncertainty evaluation"
    parts = [markdown_to_html(summary, [*curve_figures, *panels, *section_figures]), "<h2>Figures</h2>"]
    parts += [embedded_figure(folder, name, name) for name in curve_figures]
    for section in sections:
        if section.figures:
            parts.append(f"<h3>{html.escape(section.title)}</h3>")
            parts += [embedded_figure(folder, name, name) for name in section.figures]
    if panels:
        parts += ["<h2>Qualitative panels</h2>",
                  "<p>Each panel: the image with the prompt set's clicks (green: positive, red: negative) and box, "
                  "the ground truth, the prediction (magenta, outlined), the method's primary uncertainty map "
                  "(one colour scale per map kind across the methods of one image) and the errors.</p>"]
        parts += qualitative_sections(folder, qualitative_dir)
    parts.append("<h2>Tables</h2>")
    for name, heading in [*tables, *(table for section in sections for table in section.tables)]:
        parts.append(f'<details><summary>{html.escape(heading)} (<a href="{html.escape(name, quote=True)}">'
                     f"{html.escape(name)}</a>)</summary>{_csv_table(folder / name)}</details>")
    if provenance:
        parts += ["<h2>Provenance</h2>",
                  "<pre>" + html.escape(yaml.safe_dump(provenance, sort_keys=False, default_flow_style=False))
                  + "</pre>"]
    title = html.escape(f"Uncertainty evaluation: {folder.name}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{_STYLE}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")
