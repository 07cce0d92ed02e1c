"""The figures of the next-token experiments (eval/next_token.py), drawn from their saved results.

Why apart: a figure reads the result dict alone (one run, or `next_token.combine` of several split
seeds) and never a model, so `patchscope eval next-token` and `cross-model` draw from the JSON they save,
and the experiment's own module stays free of plotting.
"""

from __future__ import annotations

from pathlib import Path

from patchscope.eval.common import pyplot, save_figure
from patchscope.eval.next_token import combine


def _as_combined(result: dict) -> dict:
    return result if "runs" in result else combine([result])


def plot(result: dict, path: Path) -> Path:
    """Precision@1 (mean ± spread over seeds) and the paper's surprisal per source layer, three readers."""
    result = _as_combined(result)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    summary = result["summary"]
    layers = [e["layer"] for e in summary["layers"]]
    ps = {p["source_layer"]: p["patchscope"] for p in summary["pairs"]}
    ps_layers = sorted(ps)
    for reader, marker, label in (
        ("logit_lens", "o-", "logit lens"),
        ("tuned_lens", "s-", "tuned lens (ridge)"),
    ):
        axes[0].errorbar(
            layers,
            [e[reader]["mean"] for e in summary["layers"]],
            yerr=[e[reader]["spread"] for e in summary["layers"]],
            fmt=marker,
            ms=3,
            label=label,
        )
    axes[0].errorbar(
        ps_layers,
        [ps[k]["mean"] for k in ps_layers],
        yerr=[ps[k]["spread"] for k in ps_layers],
        fmt="^-",
        ms=3,
        label="token identity Patchscope",
    )
    axes[0].set_ylabel("Precision@1")
    runs = result["runs"]
    for reader, marker, label in (
        ("logit_lens", "o-", "logit lens"),
        ("tuned_lens", "s-", "tuned lens (ridge)"),
    ):
        axes[1].plot(
            layers,
            [
                sum(r["layers"][k][reader]["surprisal_nats"] for r in runs) / len(runs)
                for k in range(len(layers))
            ],
            marker,
            ms=3,
            label=label,
        )
    axes[1].plot(
        [p["source_layer"] for p in runs[0]["pairs"]],
        [
            sum(r["pairs"][k]["patchscope"]["surprisal_nats"] for r in runs) / len(runs)
            for k in range(len(runs[0]["pairs"]))
        ],
        "^-",
        ms=3,
        label="token identity Patchscope",
    )
    axes[1].set_ylabel("surprisal −ln p^L(top-1) (nats)")
    for ax in axes:
        ax.set_xlabel(f"source layer ({result['source']})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    title = (
        f"next token: {result['source']} -> {result['target']}, {result['positions']} positions "
        f"over seeds {result['seeds']}"
    )
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_pairs(result: dict, path: Path) -> Path:
    """Cross-model: Precision@1 per (ℓ, ℓ*) as heat maps (the paper's Fig. 10/11), one per target prompt."""
    result = _as_combined(result)
    plt = pyplot()
    pairs = result["summary"]["pairs"]
    rows = sorted({p["source_layer"] for p in pairs})
    cols = sorted({p["target_layer"] for p in pairs})
    readers = [r for r in ("patchscope", "same_prompt") if r in pairs[0]]
    titles = {"patchscope": "identity prompt", "same_prompt": "T = S (source text)"}
    fig, axes = plt.subplots(1, len(readers), figsize=(4.8 * len(readers) + 0.6, 4.2), squeeze=False)
    for ax, reader in zip(axes[0], readers, strict=True):
        grid = [[float("nan")] * len(cols) for _ in rows]
        for p in pairs:
            grid[rows.index(p["source_layer"])][cols.index(p["target_layer"])] = p[reader]["mean"]
        image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel(f"target layer ℓ* ({result['target']})")
        ax.set_ylabel(f"source layer ℓ ({result['source']})")
        ax.set_title(titles[reader], fontsize=9)
        fig.colorbar(image, ax=ax, label="Precision@1")
    fig.suptitle(
        f"next token across models, {result['positions']} positions over seeds {result['seeds']}", fontsize=10
    )
    save_figure(fig, path)
    plt.close(fig)
    return path
