"""One renderer per experiment for `docs/results.md` (eval/report.py), from that experiment's saved JSON.

Why apart: each renderer is a function of one result alone and writes its section's Markdown (the
command, how it differs from the paper, the sentence its numbers support and the table), while the page
writer decides which results exist, their order, the comparison with the paper's figures and the plots.
"""

from __future__ import annotations

from patchscope.eval.common import proportion
from patchscope.eval.report_format import _deviation, _mean, _missing, _share


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
    has_mean = "mean_state_best_l_star_accuracy" in result  # results saved before it lack it
    floor = max(
        result["vanilla"]["p"],
        result["no_patch_control"]["p"],
        result["constant_answer"]["p"],
        result["mean_state_best_l_star_accuracy"]["p"] if has_mean else 0.0,
    )
    mean_rows = (
        f"| mean-state control at the best pair's ℓ*={b} (T = π2, ℓ*'s mean state at `x`) | "
        f"{_share(result['mean_state_at_best_pair'])} |\n"
        f"| mean-state control, best fixed ℓ*={result['mean_state_best_l_star']} | "
        f"{_share(result['mean_state_best_l_star_accuracy'])} |\n"
        f"| mean-state control, any ℓ* (oracle) | {_share(result['mean_state_oracle'])} |\n"
        if has_mean
        else "| mean-state control | – |\n"
    )
    table = (
        "| method | accuracy [95% CI] (k/n) |\n|---|---:|\n"
        f"| vanilla (τ as one prompt) | {_share(result['vanilla'])} |\n"
        "| \"Let's think step by step\" + τ (the paper's CoT baseline, literal) | "
        f"{_share(result['step_by_step'])} |\n"
        f"| two-step chain (hop 1's answer prompted into hop 2) | {_share(result['chain'])} |\n"
        f"| no-patch control (T = π2 with `x`, nothing patched) | {_share(result['no_patch_control'])} |\n"
        f"| constant answer (each composition's most common answer) | {_share(result['constant_answer'])} |\n"
        + mean_rows
        + f"| CoT Patchscope, best fixed pair ℓ={a}, ℓ*={b} | {_share(best)} |\n"
        f"| CoT Patchscope, any pair (oracle) | {_share(oracle)} |\n\n"
    )
    mean_note = (
        " The mean-state control's best ℓ* and oracle are chosen after seeing the answers, as the best pair "
        f"and the Patchscope's oracle are; {_share(result['best_pair_same_as_mean_state'])} of the best "
        f"pair's outputs and {_share(result['same_as_mean_state'])} of all pairs' outputs equal (first "
        "line) their ℓ*'s mean-state output."
        if has_mean
        else ""
    )
    if has_mean and oracle["p"] <= result["mean_state_oracle"]["p"]:
        mean_note += (
            " **The Patchscope's oracle over pairs does not beat the mean-state control's over ℓ*** "
            f"({oracle['p']:.3f} vs {result['mean_state_oracle']['p']:.3f})."
        )
    if best["p"] > floor:
        verdict = (
            f"The best fixed pair beats vanilla and the controls ({best['p']:.3f} > {floor:.3f}); its "
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
        + mean_note
        + " Every pair's generation per query is stored in the JSON (`queries[].patchscope`).\n"
    )
