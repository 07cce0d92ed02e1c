"""The results page's notation (eval/report.py): how a share, a mean or a missing result is written.

Why apart: every section renderer and the page writer print their figures the same way (a share with
its Wilson interval and k/n, a mean with its interval, mean ± half the range over seeds, the "not run
yet" and "deviation from the paper" lines), so a change of notation is made once.
"""

from __future__ import annotations


def _missing(command: str) -> str:
    return f"_Not run yet: `{command}`._\n"


def _share(p: dict) -> str:
    """k/n, the share and its Wilson interval."""
    return f"{p['p']:.3f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}] ({p['k']}/{p['n']})"


def _mean(m: dict) -> str:
    return f"{m['mean']:.3f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]"


def _pm(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['spread']:.3f}"


def _deviation(text: str) -> str:
    return f"**Deviation from the paper:** {text}\n\n"


def _mean_r(s: dict) -> str:
    if not s["n"]:
        return "–"
    return f"{s['rouge_l']:.3f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] (n={s['n']})"
