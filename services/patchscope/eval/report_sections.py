"""One renderer per experiment for `docs/results.md` (eval/report.py), from that experiment's saved JSON.

Why apart: each renderer is a function of one result alone and writes its section's Markdown (the
command, how it differs from the paper, the sentence its numbers support and the table), while the page
writer decides which results exist, their order, the comparison with the paper's figures and the plots.
"""

from __future__ import annotations

from patchscope.eval.common import proportion
from patchscope.eval.report_format import _deviation, _mean, _missing, _pm, _share


def next_token_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    if "runs" not in result:
        return _missing(command + "  (the saved result predates the seeded protocol)")
    runs = result["runs"]
    summary = result["summary"]
    lens = {e["layer"]: e for e in summary["layers"]}
    by_run = [{p["source_layer"]: p for p in r["pairs"]} for r in runs]
    by_run_layers = [{e["layer"]: e for e in r["layers"]} for r in runs]

    def surprisal(layer: int, reader: str) -> float:
        if reader == "patchscope":
            values = [r[layer]["patchscope"].get("surprisal_nats", float("nan")) for r in by_run]
        else:
            values = [r[layer][reader].get("surprisal_nats", float("nan")) for r in by_run_layers]
        return sum(values) / len(values)

    def same_share(layer: int) -> str:
        k = sum(r[layer]["patchscope"].get("same_as_unpatched", {}).get("k", 0) for r in by_run)
        n = sum(r[layer]["patchscope"].get("same_as_unpatched", {}).get("n", 0) for r in by_run)
        return f"{k / n:.1%}" if n else "–"

    rows = [
        "| layer | Patchscope P@1 | logit lens P@1 | tuned lens P@1 | Patchscope surprisal | logit lens "
        "surprisal | tuned lens surprisal | same as unpatched |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    wins, late = 0, 0
    num = len(summary["pairs"])
    for p in summary["pairs"]:
        a = p["source_layer"]
        e = lens[a]
        rows.append(
            f"| {a} | {_pm(p['patchscope'])} | {_pm(e['logit_lens'])} | {_pm(e['tuned_lens'])} | "
            f"{surprisal(a, 'patchscope'):.2f} | {surprisal(a, 'logit_lens'):.2f} | "
            f"{surprisal(a, 'tuned_lens'):.2f} | "
            f"{same_share(a)} |"
        )
        if a >= num // 2:
            late += 1
            wins += p["patchscope"]["mean"] > e["logit_lens"]["mean"]
    tuned_ahead = [
        p["source_layer"]
        for p in summary["pairs"]
        if lens[p["source_layer"]]["tuned_lens"]["mean"] > p["patchscope"]["mean"]
    ]
    text = (
        f"From the middle layer on, the Patchscope's mean Precision@1 is above the logit lens's at {wins} of "
        f"{late} layers"
        + (
            f"; the ridge tuned lens is ahead of the Patchscope at {len(tuned_ahead)} of {num} layers "
            f"(the last of them layer {max(tuned_ahead)})."
            if tuned_ahead
            else "; the ridge tuned lens is never ahead of it."
        )
    )
    control = runs[0].get("identity_control", "")
    return (
        f"`{command}` — seeds {result['seeds']} (document splits), {result['positions_per_seed'][0]} "
        "positions "
        f"of held-out documents per seed ({result['positions']} in all, at most {runs[0].get('per_text', 8)} "
        "per "
        f"text); tuned lens fitted on {runs[0]['fit_positions']} positions of the other documents of each "
        "split "
        f"({result['seconds']} s in all). P@1 is the mean over seeds ± half their range; surprisal is the "
        f"paper's −ln p^L(top-1 of the reader) in nats, averaged over seeds. The no-patch control (identity "
        f"prompt, nothing patched) answers {control!r}. Text-only (the source text itself) would score 1 by "
        f"definition here, since the reference is the model's own prediction.\n\n{text}\n\n"
        + "\n".join(rows)
        + "\n"
    )


def cross_model_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    if "runs" not in result:
        return _missing(command + "  (the saved result predates the seeded grid)")
    runs = result["runs"]
    summary = result["summary"]
    lens = {e["layer"]: e for e in summary["layers"]}
    r2 = {(p["source_layer"], p["target_layer"]): [] for p in summary["pairs"]}
    same_identity = {(p["source_layer"], p["target_layer"]): [0, 0] for p in summary["pairs"]}
    same_prompt = {(p["source_layer"], p["target_layer"]): [0, 0] for p in summary["pairs"]}
    for r in runs:
        for p in r["pairs"]:
            key = (p["source_layer"], p["target_layer"])
            r2[key].append(p.get("mapping_r2", float("nan")))
            for store, reader in ((same_identity, "patchscope"), (same_prompt, "same_prompt")):
                if reader in p:
                    store[key][0] += p[reader]["same_as_unpatched"]["k"]
                    store[key][1] += p[reader]["same_as_unpatched"]["n"]
    text_k = sum(r["text_only"]["p_at_1"]["k"] for r in runs if "text_only" in r)
    text_n = sum(r["text_only"]["p_at_1"]["n"] for r in runs if "text_only" in r)
    rows = [
        "| ℓ → ℓ* | map R² (mean) | identity prompt P@1 | same as unpatched | T = S P@1 | same as unpatched "
        "(T = S) | "
        "source logit lens | source tuned lens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in summary["pairs"]:
        key = (p["source_layer"], p["target_layer"])
        values = [v for v in r2[key] if v == v]
        ts = _pm(p["same_prompt"]) if "same_prompt" in p else "–"

        def pct(store: dict, key: tuple[int, int] = key) -> str:
            k, n = store[key]
            return f"{k / n:.0%}" if n else "–"

        rows.append(
            f"| {key[0]} → {key[1]} | {sum(values) / len(values) if values else float('nan'):.2f} | "
            f"{_pm(p['patchscope'])} | {pct(same_identity)} | {ts} | {pct(same_prompt)} | "
            f"{_pm(lens[key[0]]['logit_lens'])} | {_pm(lens[key[0]]['tuned_lens'])} |"
        )
    best_id = max(summary["pairs"], key=lambda p: p["patchscope"]["mean"])
    best_ts = max(summary["pairs"], key=lambda p: p.get("same_prompt", {"mean": -1})["mean"])
    text_only = text_k / text_n if text_n else float("nan")
    verdict = (
        f"Best identity-prompt pair {best_id['source_layer']} → {best_id['target_layer']} "
        f"({_pm(best_id['patchscope'])}); best T = S pair {best_ts['source_layer']} → "
        f"{best_ts['target_layer']} "
        f"({_pm(best_ts['same_prompt']) if 'same_prompt' in best_ts else '–'}). Text-only baseline (Gemma's "
        "own "
        f"next token on the source text, against SmolLM2's): {text_only:.3f} ({text_k}/{text_n})."
    )
    if "same_prompt" in best_ts and best_ts["same_prompt"]["mean"] <= text_only:
        verdict += (
            " **No T = S pair beats the text-only baseline**: where the T = S figure is high it is the "
            "target agreeing with the source from the text, not reading the patched state."
        )
    elif (
        "same_prompt" in best_ts
        and best_ts["same_prompt"]["mean"] - best_ts["same_prompt"]["spread"] <= text_only
    ):
        verdict += (
            " **The best T = S pair is within its spread over seeds of the text-only baseline**: the T = S "
            "figure does not show that the patched state adds anything to the text."
        )
    last = max(p["target_layer"] for p in summary["pairs"])
    verdict += (
        f" At ℓ* = {last} (the target's last layer) both prompts read the patched last-token state through "
        "the head alone, so their P@1 agree by construction."
    )
    return (
        f"`{command}` — seeds {result['seeds']}, {result['positions_per_seed'][0]} positions per seed "
        f"({result['positions']} in all). Maps: ridge-regularised affine maps fitted by `make eval` per "
        "split seed "
        "(recipe: the Makefile's `eval:` target; held-out nouns excluded) into `REGISTRY/seed-N`; eval "
        "checks "
        "each map's recorded split seed and corpus fingerprint and refuses maps fitted on its test "
        "documents. "
        "The reference is SmolLM2's own final-layer prediction, compared as a token string.\n\n"
        + _deviation(
            "the paper's Fig. 10 (Vicuna 7B → 13B) maps with affine maps trained on the paper's data and "
            f"reports all layer pairs; here a stated grid of {len(summary['pairs'])} pairs "
            f"(ℓ ∈ {sorted({p['source_layer'] for p in summary['pairs']})}, "
            f"ℓ* ∈ {sorted({p['target_layer'] for p in summary['pairs']})}), "
            f"{result['positions_per_seed'][0]} positions per seed, a 135M source and a "
            "270M target with different tokenizers. The figures are **not comparable** in level with the "
            "paper's (0.5–0.8); only the shape (which pairs work) is."
        )
        + f"{verdict}\n\n"
        + "\n".join(rows)
        + "\n"
    )


def attributes_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    if "all" not in result:
        return _missing(command + "  (the saved result predates the paper's protocol)")
    layers = result["layers"]
    rows = [
        "| tasks | n | Patchscope, mean over ℓ of some ℓ* (paper) | ℓ* = ℓ | any (ℓ, ℓ*) oracle | logistic "
        "probe, "
        "mean over ℓ | majority class | no-patch control | mean-state control, some ℓ* | mean-state "
        "control, mean over ℓ* |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts, faithfulness = [], []
    for name, label in (
        ("all", "all"),
        ("paper_tasks", "the paper's tasks present here"),
        ("other_tasks", "other tasks"),
    ):
        s = result[name]
        if not s["n"]:
            rows.append(f"| {label} | 0 | – | – | – | – | – | – | – | – |")
            continue
        has_mean = "mean_state_control" in s
        rows.append(
            f"| {label} | {s['n']} | {_mean(s['paper_mean_over_l_of_any_l_star'])} | "
            f"{_mean(s['diagonal_mean_over_l'])} | "
            f"{_share(s['any_pair_oracle'])} | {_mean(s['probe_mean_over_l'])} | "
            f"{_share(s['majority_class'])} | "
            f"{_share(s['no_patch_control'])} | "
            f"{_share(s['mean_state_control']) if has_mean else '–'} | "
            f"{_mean(s['mean_state_mean_over_l_star']) if has_mean else '–'} |"
        )
        ps, probe = s["paper_mean_over_l_of_any_l_star"]["mean"], s["probe_mean_over_l"]["mean"]
        test = s["vs_probe"]
        verdicts.append(
            f"on {label} (n = {s['n']}) the Patchscope's paper figure is {ps:.3f} against the probe's "
            f"{probe:.3f} "
            f"(sign test over samples: {test['wins']} wins, {test['losses']} losses, p = {test['p']:.3g})"
        )
        if has_mean:
            faithfulness.append(_against_mean_state(label, s))
    per_task = [
        "| relation | paper task | tried | known | Patchscope (paper) | probe | majority | no-patch | "
        "mean-state (some ℓ*) | p (Bonferroni) |"
    ]
    per_task.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["relations"]:
        if not r["known"]:
            per_task.append(
                f"| {r['relation']} | {'yes' if r['paper_task'] else ''} | {r['tried']} | 0 | – | – | – | – "
                "| – | – |"
            )
            continue
        s = r["summary"]
        p_adj = s["vs_probe"].get("p_bonferroni")
        mean_state = f"{s['mean_state_control']['p']:.2f}" if "mean_state_control" in s else "–"
        per_task.append(
            f"| {r['relation']} | {'yes' if r['paper_task'] else ''} | {r['tried']} | {r['known']} | "
            f"{s['paper_mean_over_l_of_any_l_star']['mean']:.2f} | {s['probe_mean_over_l']['mean']:.2f} | "
            f"{s['majority_class']['p']:.2f} | {s['no_patch_control']['p']:.2f} | "
            f"{mean_state} | "
            f"{f'{p_adj:.3g}' if p_adj is not None else '(n < 10)'} |"
        )
    dropped = ", ".join(f"{d['relation']} ({d['reason']})" for d in result["dropped_relations"]) or "none"
    absent = ", ".join(result["paper_tasks_absent"]) or "none"
    return (
        f"`{command}` — {len(result['relations']) + len(result['dropped_relations'])} relations run (each "
        "listed "
        f"below); of {result['tried']} samples tried ({result['max_samples_per_relation']} at most per "
        f"relation), the model answers **{result['evaluated']}** in plain text (the text-only baseline, 1 on "
        "this "
        f"set by construction); only those are evaluated, as in the paper. Grid: ℓ, ℓ* ∈ {layers}. Source "
        f"prompt `{result['source_context']}` (the subject's last token, never position 0); target: the "
        f"relation's LRE template with `x`, led by `{result['template_lead']}` where the placeholder would "
        "be at "
        f"position 0; correct when the object appears as whole words in {result['max_new_tokens']} greedy "
        "tokens. "
        f"Probe: logistic regression, 3-fold CV over up to {result['probe_samples_per_relation']} samples "
        "per "
        f"relation, read on the evaluated ones; the majority class uses the same folds (neither can name an "
        f"object absent from its training folds, so on relations with one object per subject both fail by "
        f"construction). Dropped relations: "
        f"{dropped}. Paper tasks absent from the data: {absent}. Patchscope answers equal to the no-patch "
        f"answer: {_share(result['same_as_unpatched'])}"
        + (
            "; equal to the mean-state answer at the same ℓ*: "
            f"{_share(result['same_as_mean_state'])}. The mean-state control patches ℓ*'s mean state "
            '(over a fixed warm-up text) at `x`: "some ℓ*" counts a sample when any grid ℓ* names the '
            'object (the paper figure\'s own oracle over ℓ*), "mean over ℓ*" is comparable to ℓ* = ℓ'
            + _without_inert_layer(result)
            if "same_as_mean_state" in result
            else ""
        )
        + ".\n\n"
        + _deviation(
            "the paper uses 7B–13B models, every (ℓ, ℓ*) pair and a substring rule; here a stated layer "
            "grid, "
            "a word-boundary rule, a neutral source context and ≤ "
            f"{result['max_samples_per_relation']} samples per relation."
        )
        + "In words: "
        + "; ".join(verdicts)
        + ".\n\n"
        + (" ".join(faithfulness) + "\n\n" if faithfulness else "")
        + "\n".join(rows)
        + "\n\nPer task (paired sign test of Patchscope against probe, Bonferroni over the "
        f"{result['bonferroni_tasks']} tasks with ≥ 10 samples):\n\n" + "\n".join(per_task) + "\n"
    )


def _without_inert_layer(result: dict) -> str:
    """The same-as-control shares without the grid's last ℓ*, when every answer there equals both controls.

    A patch at the last block changes no later token (the template goes on after the placeholder), so at
    that ℓ* the shares are 1 by construction and would hide how often the other layers copy a control.
    """
    layers, samples = result["layers"], [s for r in result["relations"] for s in r["samples"]]
    nl = len(layers)
    if not samples or not all(
        s[key][a * nl + nl - 1] == "1"
        for s in samples
        for a in range(nl)
        for key in ("same_as_unpatched", "same_as_mean_state")
    ):
        return ""
    kept = [(s, a * nl + b) for s in samples for a in range(nl) for b in range(nl - 1)]
    unpatched = proportion(sum(s["same_as_unpatched"][i] == "1" for s, i in kept), len(kept))
    mean_state = proportion(sum(s["same_as_mean_state"][i] == "1" for s, i in kept), len(kept))
    return (
        f". At ℓ* = {layers[-1]} (the last block) every answer equals both controls, as it must: a patch "
        "there reaches no later token; without that ℓ*, same as unpatched "
        f"{_share(unpatched)}, same as mean-state {_share(mean_state)}"
    )


def _against_mean_state(label: str, s: dict) -> str:
    """One sentence: does the paper figure (and ℓ* = ℓ) beat the mean-state control on these samples."""
    paper, control = s["paper_mean_over_l_of_any_l_star"], s["mean_state_control"]
    diagonal, diagonal_control = s["diagonal_mean_over_l"], s["mean_state_mean_over_l_star"]
    head = (
        f"Against the mean-state control on {label}: paper figure {paper['mean']:.3f} vs "
        f"{control['p']:.3f} (some ℓ*), ℓ* = ℓ {diagonal['mean']:.3f} vs {diagonal_control['mean']:.3f} "
        "(mean over ℓ*)"
    )
    if paper["mean"] <= control["p"]:
        return head + (
            " — **the Patchscope's figure does not beat the mean-state control: on these samples the "
            "template and the layer name the object as often with a state that holds no subject.**"
        )
    if paper["ci"][0] <= control["p"]:
        return head + " — above it, but **its interval reaches the mean-state control**."
    return head + " — above it, the control below the figure's interval."


def multi_hop_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    found = ", ".join(f"{k}: {v}" for k, v in result["found"].items()) or "none"
    head = (
        f"`{command}` — compositions read from the LRE data (hop 1's range = hop 2's domain, objects joined "
        "to "
        f"subjects; composition: queries): {found}. Of {result['tried']} tried "
        f"(≤ {result.get('max_samples', 'n')} per composition), **{result['evaluated']}** have both hops "
        f"answered by the model on their own and are evaluated.\n\n"
    )
    if result["evaluated"] and not isinstance(result.get("vanilla"), dict):
        return _missing(command + "  (the saved result predates the paper's protocol)")
    if not result["evaluated"]:
        return head + "**Nothing was evaluated, so nothing is concluded.**\n"
    a, b = result["patchscope_best_pair"]
    best = result["patchscope_best_pair_accuracy"]
    oracle = result["patchscope_oracle"]
    floor = max(result["vanilla"]["p"], result["no_patch_control"]["p"], result["constant_answer"]["p"])
    table = (
        "| method | accuracy [95% CI] (k/n) |\n|---|---:|\n"
        f"| vanilla (τ as one prompt) | {_share(result['vanilla'])} |\n"
        "| \"Let's think step by step\" + τ (the paper's CoT baseline, literal) | "
        f"{_share(result['step_by_step'])} |\n"
        f"| two-step chain (hop 1's answer prompted into hop 2) | {_share(result['chain'])} |\n"
        f"| no-patch control (T = π2 with `x`, nothing patched) | {_share(result['no_patch_control'])} |\n"
        f"| constant answer (each composition's most common answer) | {_share(result['constant_answer'])} |\n"
        f"| CoT Patchscope, best fixed pair ℓ={a}, ℓ*={b} | {_share(best)} |\n"
        f"| CoT Patchscope, any pair (oracle) | {_share(oracle)} |\n\n"
    )
    if best["p"] > floor:
        verdict = (
            f"The best fixed pair beats vanilla and both controls ({best['p']:.3f} > {floor:.3f}); its "
            "outputs "
            f"take {result['best_pair_distinct_outputs']} distinct forms over {result['evaluated']} queries, "
            "and "
            "the pair was chosen after seeing the answers, so this is an upper estimate."
        )
    elif oracle["p"] > floor:
        verdict = (
            "No fixed pair beats the best of vanilla and the controls; only the oracle over pairs does, "
            "which no user can choose in advance: **nothing is shown** for the CoT Patchscope here."
        )
    else:
        verdict = (
            "Even the oracle over pairs does not beat the best of vanilla and the controls: **nothing is "
            "shown** "
            "for the CoT Patchscope on this model."
        )
    return (
        head
        + _deviation(
            "the paper uses Vicuna-13B, its own composed queries and all 40 × 40 layer pairs; here π1 is "
            "built "
            f"from the data (`the <range> of <subject>`), ℓ, ℓ* ∈ {result['layers']}, "
            f"{result['max_new_tokens']} "
            "tokens, a word-boundary answer rule."
        )
        + table
        + "The two-step chain asks hop 2 with the first phrase of the model's own hop-1 answer; the filter "
        "checked hop 2 with the true bridge, so the chain falls short of 1 where that phrase is not "
        f"the bridge ({result['chain']['k']}/{result['chain']['n']} here). "
        + verdict
        + " Every pair's generation per query is stored in the JSON (`queries[].patchscope`).\n"
    )
