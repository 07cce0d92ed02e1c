"""Pictures of a sweep, like the paper's figures: rows = source layers, columns = source positions.

Each cell shows the explanation's first words, coloured by whether the answer is the source token
(identity and other generating presets) or by the top-1 probability (logit lens). The HTML page is
self-contained (inline CSS, no script, no network); the PNG needs the `[png]` extra (matplotlib).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from patchscope_client.errors import require
from patchscope_client.types import ResultTable, SiteResult


def first_words(text: str, n: int = 3) -> str:
    words = text.replace("\n", " ⏎ ").split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def matches(row: SiteResult) -> bool:
    return bool(row.answer) and row.answer.strip().lower() == row.site.source_token.strip().lower()


def score(row: SiteResult) -> float:
    """0..1: the top-1 probability for the logit lens, else 1 when the answer is the source token."""
    if row.top_k:
        return float(row.top_k[0][1])
    return 1.0 if matches(row) else 0.0


@dataclass(frozen=True)
class Grid:
    """The sweep's sites arranged by (source layer, position)."""

    layers: list[int]
    positions: list[int]
    tokens: dict[int, str]
    cells: dict[tuple[int, int], SiteResult]

    @classmethod
    def of(cls, table: ResultTable) -> Grid:
        cells = {(r.site.source_layer, r.site.position): r for r in table.rows}
        return cls(
            layers=sorted({layer for layer, _ in cells}),
            positions=sorted({p for _, p in cells}),
            tokens={r.site.position: r.site.source_token for r in table.rows},
            cells=cells,
        )


def _colour(value: float) -> str:
    """White → green as the score grows."""
    g = int(255 - 120 * value)
    return f"rgb({int(255 - 200 * value)},{max(g, 150)},{int(255 - 190 * value)})"


def to_html(table: ResultTable, title: str) -> str:
    grid = Grid.of(table)
    head = "".join(
        f'<th class="position" data-position="{p}">{html.escape(repr(grid.tokens[p]))}'
        f"<br><small>{p}</small></th>"
        for p in grid.positions
    )
    body = []
    for layer in grid.layers:
        cells = []
        for p in grid.positions:
            row = grid.cells.get((layer, p))
            if row is None:
                cells.append("<td></td>")
                continue
            tip = html.escape(f"{row.explanation!r}  (target layer {row.site.target_layer})", quote=True)
            cells.append(
                f'<td class="site" data-layer="{layer}" data-position="{p}" title="{tip}" '
                f'style="background:{_colour(score(row))}">{html.escape(first_words(row.explanation))}</td>'
            )
        body.append(f'<tr><th class="layer">{layer}</th>{"".join(cells)}</tr>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 6px; white-space: nowrap; }}
th.layer {{ text-align: right; background: #f4f4f4; }}
th.position {{ background: #f4f4f4; }}
caption {{ caption-side: top; text-align: left; padding-bottom: .6em; }}
</style></head>
<body><table id="sweep"><caption><b>{html.escape(title)}</b><br>rows: source layers · columns: source
positions · green: the answer is the source token (logit lens: top-1 probability) · hover for the whole
explanation</caption>
<thead><tr><th>layer</th>{head}</tr></thead>
<tbody>{"".join(body)}</tbody></table></body></html>
"""


def to_png(table: ResultTable, title: str, path: str) -> None:
    matplotlib = require("matplotlib", "png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = Grid.of(table)
    values = np.full((len(grid.layers), len(grid.positions)), np.nan)
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(grid.positions), 1.0 + 0.35 * len(grid.layers)))
    for i, layer in enumerate(grid.layers):
        for j, p in enumerate(grid.positions):
            row = grid.cells.get((layer, p))
            if row is not None:
                values[i, j] = score(row)
                ax.text(j, i, first_words(row.explanation, 2), ha="center", va="center", fontsize=7)
    ax.imshow(values, cmap="Greens", vmin=0, vmax=1.6, aspect="auto")
    ax.set_xticks(range(len(grid.positions)), [repr(grid.tokens[p]) for p in grid.positions], fontsize=8)
    ax.set_yticks(range(len(grid.layers)), grid.layers, fontsize=8)
    ax.set_xlabel("source position")
    ax.set_ylabel("source layer")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
