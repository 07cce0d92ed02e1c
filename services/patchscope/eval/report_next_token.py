"""The next-token renderers for `docs/results.md`: same model (§4.1) and across models (§4.4).

Why apart from `report_sections`: both read `next_token.combine`'s summary and share its controls (the
no-patch answer and the mean-state answer per ℓ*), which the other experiments' renderers never touch.
"""

from __future__ import annotations

from patchscope.eval.common import proportion
from patchscope.eval.report_format import _deviation, _missing, _pm, _share


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
        "| layer | Patchscope P@1 | logit lens P@1 | tuned lens P@1 | mean-state P@1 (its answer) | "
        "Patchscope surprisal | logit lens surprisal | tuned lens surprisal | same as unpatched | "
        "same as mean state |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    wins, late = 0, 0
    num = len(summary["pairs"])
    for p in summary["pairs"]:
        a = p["source_layer"]
        e = lens[a]
        rows.append(
            f"| {a} | {_pm(p['patchscope'])} | {_pm(e['logit_lens'])} | {_pm(e['tuned_lens'])} | "
            f"{_mean_state_cell(p)} | "
            f"{surprisal(a, 'patchscope'):.2f} | {surprisal(a, 'logit_lens'):.2f} | "
            f"{surprisal(a, 'tuned_lens'):.2f} | "
            f"{same_share(a)} | {_same_as_mean_state_cell(p)} |"
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
    text += _next_token_against_mean_state(summary["pairs"], _pooled_patchscope(runs), "layer")
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
        f"definition here, since the reference is the model's own prediction. The mean-state control "
        "patches ℓ*'s mean state (over the warm-up text) into the same prompt: one answer per ℓ*, scored "
        "against every reference (pooled over seeds with its Wilson interval where stated).\n\n"
        f"{text}\n\n" + "\n".join(rows) + "\n"
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
        "| ℓ → ℓ* | map R² (mean) | identity prompt P@1 | same as unpatched | mean-state P@1 (its answer) "
        "| same as mean state | T = S P@1 | same as unpatched (T = S) | source logit lens "
        "| source tuned lens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"{_pm(p['patchscope'])} | {pct(same_identity)} | {_mean_state_cell(p)} | "
            f"{_same_as_mean_state_cell(p)} | {ts} | {pct(same_prompt)} | "
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
    verdict += _next_token_against_mean_state(summary["pairs"], _pooled_patchscope(runs), "pair")
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


def _mean_state_cell(p: dict) -> str:
    """A pair's mean-state P@1 (mean ± half range over seeds) and the answer it gives; – if not measured."""
    if "mean_state_control" not in p:
        return "–"
    control = p["mean_state_control"]
    answer = repr(control["answers"][0]).replace("|", "\\|")  # a table cell
    return f"{_pm(control)} ({answer})"


def _same_as_mean_state_cell(p: dict) -> str:
    return f"{p['same_as_mean_state']['p']:.1%}" if "same_as_mean_state" in p else "–"


def _pooled_patchscope(runs: list[dict]) -> list[dict]:
    """Each pair's Patchscope P@1 pooled over seeds (k/n with its Wilson interval), in the summary's order."""
    return [
        proportion(
            sum(r["pairs"][k]["patchscope"]["p_at_1"]["k"] for r in runs),
            sum(r["pairs"][k]["patchscope"]["p_at_1"]["n"] for r in runs),
        )
        for k in range(len(runs[0]["pairs"]))
    ]


def _next_token_against_mean_state(pairs: list[dict], pooled: list[dict], unit: str) -> str:
    """The verdict against the mean-state control: where a Patchscope P@1 does not beat its ℓ*'s constant.

    `pooled` is each pair's Patchscope P@1 pooled over seeds: where its interval reaches the control's, the
    difference is not established on this n even if the mean is ahead.
    """
    measured = [(p, ps) for p, ps in zip(pairs, pooled, strict=True) if "mean_state_control" in p]
    if not measured:
        return ""

    def name(p: dict) -> str:
        a, b = p["source_layer"], p["target_layer"]
        return str(a) if unit == "layer" else f"{a} → {b}"

    behind = [p for p, _ in measured if p["patchscope"]["mean"] <= p["mean_state_control"]["mean"]]
    close = [
        p
        for p, ps in measured
        if p not in behind and ps["ci"][0] <= p["mean_state_control"]["pooled"]["ci"][1]
    ]
    best = max((p for p, _ in measured), key=lambda p: p["mean_state_control"]["mean"])
    control = best["mean_state_control"]
    text = (
        f" The best mean-state control (ℓ* = {best['target_layer']}, always {control['answers'][0]!r}) "
        f"scores {_share(control['pooled'])} pooled over seeds."
    )
    if behind:
        text += (
            f" **At {len(behind)} of {len(measured)} {unit}s the Patchscope does not beat the mean-state "
            f"control of its ℓ*** ({', '.join(name(p) for p in behind)}): there its P@1 is no more than a "
            "constant answer, which reads nothing from the state, would score."
        )
    else:
        text += f" The Patchscope's mean P@1 beats the mean-state control of its ℓ* at every {unit}."
    if close:
        text += (
            f" At {len(close)} of {len(measured)} {unit}s ({', '.join(name(p) for p in close)}) its mean is "
            "ahead but the 95% interval of its P@1 pooled over seeds reaches the control's: the difference "
            "is not established on this n."
        )
    return text
