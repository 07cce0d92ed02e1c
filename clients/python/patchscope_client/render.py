"""Pictures of a sweep, like the paper's figures: rows = source layers, columns = source positions.

Each cell shows the explanation's first words. A cell whose answer is what the target says with nothing
patched (`same_as_unpatched`) is hatched grey: it says nothing about the state, however right it looks.
The rest are shaded by the calibrated confidence, or by the patch effect where no calibrator is
registered, or, without controls, by whether the answer is the source token (logit lens: the top-1
probability); the legend names the measure. The HTML page is self-contained (inline CSS, no script, no
network); the PNG needs the `[png]` extra (matplotlib).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

from patchscope_client.errors import require
from patchscope_client.types import ResultTable, SiteResult

HATCH_CSS = "repeating-linear-gradient(45deg,#e4e4e4 0 4px,#c4c4c4 4px 8px)"
SAME_TEXT = "#6b6b6b"
SAME_LABEL = "= unpatched: the same answer as with nothing patched (it does not depend on the state)"


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


def same_as_unpatched(row: SiteResult) -> bool:
    return row.control is not None and row.control.same_as_unpatched


@dataclass(frozen=True)
class Shading:
    """What a sweep's cells are shaded by: one measure for the whole picture, so colours compare."""

    label: str
    value: Callable[[SiteResult], float | None]  # 0..1, None: this site has no value

    @classmethod
    def of(cls, table: ResultTable) -> Shading:
        controls = [r.control for r in table.rows if r.control is not None]
        if any(c.confidence is not None for c in controls):
            return cls("confidence (calibrated probability that the answer is right)", _confidence)
        if any(c.patch_effect is not None for c in controls):
            return cls("patch effect (first-token distribution moved by the patch; no calibrator)", _effect)
        if any(r.top_k for r in table.rows):
            return cls("top-1 probability (logit lens)", score)
        return cls("answer is the source token", score)


def _confidence(row: SiteResult) -> float | None:
    return row.control.confidence if row.control is not None else None


def _effect(row: SiteResult) -> float | None:
    return row.control.patch_effect if row.control is not None else None


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
    """White → green as the value grows."""
    g = int(255 - 120 * value)
    return f"rgb({int(255 - 200 * value)},{max(g, 150)},{int(255 - 190 * value)})"


def _tip(row: SiteResult) -> str:
    tip = f"{row.explanation!r}  (target layer {row.site.target_layer})"
    c = row.control
    if c is not None:
        facts = [f"unpatched: {c.unpatched_answer!r}"]
        for name, value in (("confidence", c.confidence), ("patch effect", c.patch_effect)):
            if value is not None:
                facts.append(f"{name} {value:.2f}")
        if c.dependence is not None:
            facts.append(f"dependence {c.dependence:+.2f} nats/token")
        tip += "  " + ", ".join(facts)
    return html.escape(tip, quote=True)


def _cell(row: SiteResult, shading: Shading) -> str:
    layer, p = row.site.source_layer, row.site.position
    words = html.escape(first_words(row.explanation))
    if same_as_unpatched(row):
        return (
            f'<td class="site" data-layer="{layer}" data-position="{p}" data-control="same-as-unpatched" '
            f'title="{_tip(row)}" style="background:{HATCH_CSS};color:{SAME_TEXT}">{words}</td>'
        )
    value = shading.value(row)
    background = "#fff" if value is None else _colour(value)
    shade = "" if value is None else f' data-shade="{value:.3f}"'
    return (
        f'<td class="site" data-layer="{layer}" data-position="{p}"{shade} title="{_tip(row)}" '
        f'style="background:{background}">{words}</td>'
    )


def _legend(table: ResultTable, shading: Shading) -> str:
    ramp = "".join(
        f'<span class="swatch" style="background:{_colour(v / 4)}">{v / 4:.2f}</span>' for v in range(5)
    )
    items = [f'<div>{html.escape(shading.label)}: {ramp} <span class="swatch blank">no value</span></div>']
    if any(r.control is not None for r in table.rows):
        items.append(
            f'<div><span class="swatch" style="background:{HATCH_CSS};color:{SAME_TEXT}">word</span> '
            f"{html.escape(SAME_LABEL)}</div>"
        )
    else:
        items.append("<div>no controls in this sweep: nothing marks answers the target gives anyway</div>")
    return f'<div id="legend">{"".join(items)}</div>'


def to_html(table: ResultTable, title: str) -> str:
    grid, shading = Grid.of(table), Shading.of(table)
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
            cells.append("<td></td>" if row is None else _cell(row, shading))
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
#legend {{ font-size: 12px; margin-top: .8em; line-height: 2; }}
.swatch {{ display: inline-block; min-width: 2.6em; padding: 0 4px; border: 1px solid #ccc;
  text-align: center; }}
.swatch.blank {{ background: #fff; }}
</style></head>
<body><table id="sweep"><caption><b>{html.escape(title)}</b><br>rows: source layers · columns: source
positions · hover for the whole explanation and its controls</caption>
<thead><tr><th>layer</th>{head}</tr></thead>
<tbody>{"".join(body)}</tbody></table>
{_legend(table, shading)}</body></html>
"""


def to_png(table: ResultTable, title: str, path: str) -> None:
    matplotlib = require("matplotlib", "png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch, Rectangle

    grid, shading = Grid.of(table), Shading.of(table)
    values = np.full((len(grid.layers), len(grid.positions)), np.nan)
    same: list[tuple[int, int]] = []
    fig, ax = plt.subplots(figsize=(3.2 + 1.6 * len(grid.positions), 1.6 + 0.35 * len(grid.layers)))
    for i, layer in enumerate(grid.layers):
        for j, p in enumerate(grid.positions):
            row = grid.cells.get((layer, p))
            if row is None:
                continue
            if same_as_unpatched(row):
                same.append((i, j))
            elif (value := shading.value(row)) is not None:
                values[i, j] = value
            colour = SAME_TEXT if same_as_unpatched(row) else "black"
            ax.text(j, i, first_words(row.explanation, 2), ha="center", va="center", fontsize=7, color=colour)
    image = ax.imshow(values, cmap="Greens", vmin=0, vmax=1.6, aspect="auto")
    for i, j in same:  # hatched grey, drawn over the (empty) cell and under the text
        ax.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5), 1, 1, facecolor="#dcdcdc", edgecolor="#9a9a9a", hatch="///", zorder=0.5
            )
        )
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, ticks=[0, 0.25, 0.5, 0.75, 1.0])
    bar.ax.set_ylim(0, 1)
    bar.set_label(shading.label.split(" (")[0], fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if any(r.control is not None for r in table.rows):
        ax.legend(
            handles=[Patch(facecolor="#dcdcdc", edgecolor="#9a9a9a", hatch="///", label=SAME_LABEL)],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12 - 0.4 / max(len(grid.layers), 1)),
            fontsize=7,
            frameon=False,
        )
    ax.set_xticks(range(len(grid.positions)), [repr(grid.tokens[p]) for p in grid.positions], fontsize=8)
    ax.set_yticks(range(len(grid.layers)), grid.layers, fontsize=8)
    ax.set_xlabel("source position")
    ax.set_ylabel("source layer")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
