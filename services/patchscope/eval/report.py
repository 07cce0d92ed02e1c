"""`docs/results.md`, rendered from the experiments' saved JSON: no number on the page is typed by hand.

Each section names the command that produced its numbers; a result that is missing says which command
makes it. The sentences that compare methods are computed from the same numbers, so they stay true when
a rerun changes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from patchscope.eval.common import wilson

HEADER = """# Results: the Patchscopes paper's experiments on the embedded models

Every table and plot here is written by `patchscope eval report` from the JSON files that the commands
named in each section save under `docs/results/` (seeded; rerunning reproduces them up to floating-point
noise). Models: SmolLM2-135M (30 layers) and Gemma-3-270M (18 layers), float32 on a 2-core CPU. Data:
`../shared/data/wikitext-2/valid.txt` (split by document) and the LRE relations in `../shared/data/lre/`.

How the experiments differ from the paper's, on purpose or by necessity:

- **Next token**: the reference is the model's own final-layer prediction at a random position of a
  held-out sentence (at most 8 positions per text); the token identity Patchscope patches the state into
  the last position of `cat -> cat\n1135 -> 1135\nhello -> hello\n?` at the same layer and reads the
  target's first token. The tuned lens is a ridge map per layer to the last layer (not the paper's
  trained lens with a KL loss), fitted on other documents.
- **Attributes**: the source prompt is the subject alone (its last token); the target prompt is the
  relation's first LRE template with the placeholder token `x`. Greedy, 8 new tokens; correct when the
  object appears in them. Only samples the model answers in plain text count, so the number evaluated
  is small for a 135M model, and per-relation figures rest on few samples.
- **Multi-hop**: the compositions and their one-sentence prompts are written in `multihop.py`; the
  "chain of thought" baseline is the explicit two-step chain (hop 1's generated answer prompted into
  hop 2), since a 135M model does not follow a step-by-step instruction.
- **Oracles** ("any layer", "any pair") pick the best layer after seeing the answers; they bound what a
  perfect layer choice could do and are not achievable figures.
"""


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _missing(command: str) -> str:
    return f"_Not run yet: `{command}`._\n"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def next_token_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    lens = {e["layer"]: e for e in result["layers"]}
    rows = [
        "| layer | Patchscope P@1 | logit lens P@1 | tuned lens P@1 | Patchscope surprisal | logit lens "
        "surprisal | tuned lens surprisal | Patchscope misses that repeat the prompt |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    wins, late = 0, 0
    num = len(result["pairs"])
    for p in result["pairs"]:
        e = lens[p["source_layer"]]
        ps, ll, tl = p["patchscope"], e["logit_lens"], e["tuned_lens"]
        rows.append(
            f"| {p['source_layer']} | {ps['precision_at_1']:.3f} | {ll['precision_at_1']:.3f} | "
            f"{tl['precision_at_1']:.3f} | {ps['surprisal_bits']:.2f} | {ll['surprisal_bits']:.2f} | "
            f"{tl['surprisal_bits']:.2f} | {_pct(ps['pattern_rate'])} |"
        )
        if p["source_layer"] >= num // 2:
            late += 1
            wins += ps["precision_at_1"] > ll["precision_at_1"]
    first = result["pairs"][0]
    early = (
        f"At layer {first['source_layer']} the Patchscope's Precision@1 is "
        f"{first['patchscope']['precision_at_1']:.3f} against the logit lens's "
        f"{lens[first['source_layer']]['logit_lens']['precision_at_1']:.3f}; "
        f"from the middle layer on it beats the logit lens at {wins} of {late} layers."
    )
    tuned_ahead = [
        p["source_layer"]
        for p in result["pairs"]
        if lens[p["source_layer"]]["tuned_lens"]["precision_at_1"] > p["patchscope"]["precision_at_1"]
    ]
    if tuned_ahead:
        early += (
            f" The tuned lens (trained for exactly this task) is ahead of the Patchscope at "
            f"{len(tuned_ahead)} layers, the last of them layer {max(tuned_ahead)}."
        )
    return (
        f"`{command}` — {result['positions']} positions of held-out documents; tuned lens fitted on "
        f"{result['fit_positions']} positions of other documents ({result['seconds']} s in all).\n\n"
        f"{early}\n\n" + "\n".join(rows) + "\n"
    )


def cross_model_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    lens = {e["layer"]: e for e in result["layers"]}
    rows = [
        "| ℓ → ℓ* | mapping R² | Patchscope P@1 [95% CI] | source logit lens P@1 | source tuned lens P@1 | "
        "misses that repeat the prompt |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    n = result["positions"]
    for p in result["pairs"]:
        ps = p["patchscope"]
        low, high = wilson(round(ps["precision_at_1"] * n), n)
        rows.append(
            f"| {p['source_layer']} → {p['target_layer']} | {p.get('mapping_r2', float('nan')):.3f} | "
            f"{ps['precision_at_1']:.3f} [{low:.3f}, {high:.3f}] | "
            f"{lens[p['source_layer']]['logit_lens']['precision_at_1']:.3f} | "
            f"{lens[p['source_layer']]['tuned_lens']['precision_at_1']:.3f} | {_pct(ps['pattern_rate'])} |"
        )
    best = max(result["pairs"], key=lambda p: p["patchscope"]["precision_at_1"])
    return (
        f"`{command}` — {result['source']} states mapped by the registry's best mapping of each pair and "
        f"patched into {result['target']}'s identity prompt; the reference is {result['source']}'s own "
        f"final-layer prediction, compared as a token string. Best pair: {best['source_layer']} → "
        f"{best['target_layer']} ({best['patchscope']['precision_at_1']:.3f}).\n\n" + "\n".join(rows) + "\n"
    )


def attributes_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    rows = ["| relation | tried | known in plain text | best layer | accuracy there | any layer (oracle) |"]
    rows.append("|---|---:|---:|---:|---:|---:|")
    for r in result["relations"]:
        if not r["known"]:
            rows.append(f"| {r['relation']} | {r['tried']} | 0 | – | – | – |")
            continue
        best = max(r["accuracy"], key=lambda k: r["accuracy"][k])
        rows.append(
            f"| {r['relation']} | {r['tried']} | {r['known']} | {best} | {r['accuracy'][best]:.2f} | "
            f"{r['any_layer']:.2f} |"
        )
    return (
        f"`{command}` — of {result['tried']} samples tried ({result['max_samples_per_relation']} at most "
        f"per relation), the model answers **{result['evaluated']}** when prompted in plain text; only those "
        f"are evaluated, as in the paper. Over them: best fixed layer **{result['best_layer']}** with "
        f"accuracy **{result['best_layer_accuracy']:.3f}**; the linear probe's best layer "
        f"{result['best_probe_layer']} reaches {result['best_probe_accuracy']:.3f}. The paper's \"any "
        f'layer" figure is an **oracle** (a sample counts if any layer gets it right, which no user can '
        f"choose in advance): {result['any_layer_oracle']:.3f}.{_layer_zero_note(result)}\n\n"
        + "\n".join(rows)
        + "\n"
    )


def _layer_zero_note(result: dict) -> str:
    """Layer 0 holds little more than the subject's last token: say so when it is the best layer."""
    if result["best_layer"] != 0:
        return ""
    later = {k: v for k, v in result["accuracy_by_layer"].items() if k != "0"}
    best = max(later, key=lambda k: later[k])
    return (
        " Layer 0 wins because its state is little more than the subject's last token: for a one-token "
        "subject the patched prompt *is* the plain prompt each sample was chosen to pass. Among the "
        f"layers above it, the best is layer {best} ({later[best]:.3f})."
    )


def multi_hop_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    found = ", ".join(f"{k}: {v}" for k, v in result["found"].items())
    a, b = result["patchscope_best_pair"]
    return (
        f"`{command}` — two-hop queries found in the LRE data (composition: queries): {found}. Of "
        f"{result['tried']} tried, **{result['evaluated']}** have both hops answered by the model on their "
        f"own and are evaluated.\n\n"
        "| method | accuracy |\n|---|---:|\n"
        f"| vanilla (one composed prompt) | {result['vanilla']:.3f} |\n"
        f"| chain of thought (hop 1's answer prompted into hop 2) | {result['chain_of_thought']:.3f} |\n"
        f"| hop 2's template with the literal placeholder, nothing patched (control) | "
        f"{result.get('unpatched_template', float('nan')):.3f} |\n"
        f"| CoT Patchscope, best fixed pair ℓ={a}, ℓ*={b} | {result['patchscope_best_pair_accuracy']:.3f} |\n"
        f"| CoT Patchscope, any pair (oracle) | {result['patchscope_oracle']:.3f} |\n\n"
        "The chain's two prompts are the ones the filter already checked, so on this set it scores "
        "(close to) 1 by construction: it shows the model knows both facts, which the one composed "
        "prompt and the Patchscope must combine in a single pass. "
        + (
            "The CoT Patchscope's best fixed pair beats the vanilla prompt here."
            if result["patchscope_best_pair_accuracy"] > result["vanilla"]
            else "The paper's finding does not hold on this model: the CoT Patchscope's best fixed pair does "
            "not beat the vanilla prompt."
        )
        + "\n"
    )


def write_report(folder: Path, page: Path) -> Path:
    """Render the page from `folder`'s results; plots are linked relative to the page."""
    rel = folder.relative_to(page.parent) if folder.is_relative_to(page.parent) else folder
    parts = [HEADER]

    def picture(name: str, alt: str) -> str:
        return f"\n![{alt}]({rel / (name + '.png')})\n" if (folder / f"{name}.png").exists() else ""

    parts.append("\n## 1. Next token from intermediate layers (§4.1)\n")
    for model in ("smollm2-135m", "gemma3-270m"):
        name = f"next_token.{model}.{model}"
        parts.append(f"\n### {model} → itself\n\n")
        parts.append(next_token_section(_load(folder, name), f"patchscope eval next-token --source {model}"))
        parts.append(picture(name, f"next token, {model}"))
    parts.append("\n## 2. Attribute extraction (§4.2)\n\n")
    name = "attributes.smollm2-135m"
    parts.append(attributes_section(_load(folder, name), "patchscope eval attributes --model smollm2-135m"))
    parts.append(picture(name, "attribute extraction per layer"))
    parts.append("\n## 3. Cross-model patching (§4.4)\n\n")
    name = "cross_model.smollm2-135m.gemma3-270m"
    parts.append(
        cross_model_section(
            _load(folder, name), "patchscope eval cross-model --source smollm2-135m --target gemma3-270m"
        )
    )
    parts.append(picture(name, "cross-model next token"))
    parts.append("\n## 4. Multi-hop self-correction (§5)\n\n")
    name = "multi_hop.smollm2-135m"
    parts.append(multi_hop_section(_load(folder, name), "patchscope eval multi-hop --model smollm2-135m"))
    parts.append(picture(name, "CoT Patchscope accuracy per layer pair"))
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("".join(parts), encoding="utf-8")
    return page
