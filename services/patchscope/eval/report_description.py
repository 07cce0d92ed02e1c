"""The results page's §4.3 section (entity description), from one saved description result.

Why apart from `report_sections`: its result has groups of its own (popular/rare by a proxy, corpus and
LRE entities) and its own verdict rules; the other experiments' renderers stay there.
"""

from __future__ import annotations

from patchscope.eval.report_format import _deviation, _mean_r, _missing, _share


def _documents(result: dict) -> str:
    """Which corpus documents the titles came from, where the result records it."""
    return f", from {result['corpus_documents']}" if result.get("corpus_documents") else ""


def _popularity(result: dict) -> str:
    """How the result split popular from rare entities, in the words of its own record."""
    if "popularity_proxy" in result:
        return (
            "popular (proxy: the source model's mean surprisal per token of the name after "
            f"`{result['source_context'].split('{}')[0].strip()}`, below the entities' median)"
        )
    return f"popular (name ≤ {result['popular_tokens']} source tokens)"


def _against_mean_state(best: dict, pairs: list[dict]) -> str:
    """Does the best pair beat the mean-state control at its own ℓ*, and at how many pairs it does not."""
    control = best["mean_state_control"]["all"]
    behind = sum(p["all"]["rouge_l"] <= p["mean_state_control"]["all"]["rouge_l"] for p in pairs)
    head = (
        f"Against the mean-state control at ℓ* = {best['target_layer']} "
        f"({best['mean_state_description'][:40]!r}): {_mean_r(control)}; "
        f"{_share(best['same_as_mean_state'])} of the best pair's descriptions equal it. At {behind} of "
        f"{len(pairs)} pairs the mean-state control at ℓ* scores at least as high as the Patchscope."
    )
    if best["all"]["rouge_l"] <= control["rouge_l"]:
        return head + (
            " **The mean-state control scores at least as high as the best pair: a state that holds no "
            "entity gets as close to the references (a generic description shares their category words), "
            "so nothing is shown beyond it.**"
        )
    if best["all"]["ci"][0] <= control["rouge_l"]:
        return head + (
            " **The best pair's interval reaches the mean-state control: nothing is shown beyond it.**"
        )
    return head + " The mean-state control is below the best pair's interval."


def description_section(result: dict | None, command: str) -> str:
    if result is None:
        return _missing(command)
    if "popularity_proxy" not in result:
        return _missing(command + "  (the saved result predates the median popularity split)")
    counts = result["counts"]
    has_mean = all("mean_state_control" in p for p in result["pairs"])
    rows = [
        "| ℓ → ℓ* | ROUGE-L, all | popular | rare | corpus entities | LRE entities | same as unpatched | "
        "mean-state control at ℓ*, all | same as mean-state |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["pairs"]:
        rows.append(
            f"| {p['source_layer']} → {p['target_layer']} | {_mean_r(p['all'])} | {_mean_r(p['popular'])} | "
            f"{_mean_r(p['rare'])} | {_mean_r(p['corpus'])} | {_mean_r(p['lre'])} | "
            f"{_share(p['same_as_unpatched'])} | "
            f"{_mean_r(p['mean_state_control']['all']) if has_mean else '–'} | "
            f"{_share(p['same_as_mean_state']) if has_mean else '–'} |"
        )
    for name, label in (
        ("text_only", "text-only (name in the prompt)"),
        ("no_patch_control", "no-patch control"),
    ):
        s = result[name]
        rows.append(
            f"| {label} | {_mean_r(s['all'])} | {_mean_r(s['popular'])} | {_mean_r(s['rare'])} | "
            f"{_mean_r(s['corpus'])} | {_mean_r(s['lre'])} | – | – | – |"
        )
    best = max(result["pairs"], key=lambda p: p["all"]["rouge_l"])
    text_only = result["text_only"]["all"]
    control = result["no_patch_control"]["all"]
    verdict = (
        f"Best pair {best['source_layer']} → {best['target_layer']}: {_mean_r(best['all'])}, against "
        "text-only "
        f"{_mean_r(text_only)} and no-patch {_mean_r(control)}."
    )
    if best["all"]["ci"][0] <= control["rouge_l"]:
        verdict += (
            " **Its interval reaches the no-patch control: nothing is shown beyond the prompt's habits.**"
        )
    elif best["all"]["rouge_l"] < text_only["rouge_l"]:
        verdict += " It beats the no-patch control but not the text-only baseline."
    else:
        inside = best["all"]["ci"][0] <= text_only["rouge_l"]
        verdict += (
            " It is above both baselines' means"
            + (
                ", but its interval holds the text-only mean"
                if inside
                else ", the text-only mean below its interval"
            )
            + "; the pair is the best of "
            f"{len(result['pairs'])}, chosen after seeing the scores, so this is an upper estimate."
        )
    if has_mean:
        verdict += " " + _against_mean_state(best, result["pairs"])
    return (
        f"`{command}` — {counts['all']} entities ({counts['corpus']} WikiText titles with the predicate of "
        f"their lead sentence{_documents(result)}, {counts['lre']} LRE subjects described from their "
        "relation's data); "
        f"{_popularity(result)}: {counts['popular']}, rare: {counts['rare']}. "
        "Source "
        f"prompt `{result['source_context']}`, the paper's few-shot description prompt as target, "
        f"{result['max_new_tokens']} greedy tokens, the description up to its first comma. ROUGE-L F "
        f"(rouge-score's rule: lower case, alphanumeric tokens, no stemmer), mean with a bootstrap 95% "
        f"interval over entities. Control output: {result['control'][:60]!r}."
        + (
            " The mean-state control patches the target's mean state at ℓ* (over a fixed warm-up text) "
            "at `x`, one description per ℓ*, scored against every entity's reference."
            if has_mean
            else ""
        )
        + (
            " The popular/rare split was redone from the saved descriptions (`--rescore`; greedy, so a "
            "rerun generates the same texts)."
            if result.get("rescored")
            else ""
        )
        + "\n\n"
        + _deviation(
            "the paper describes Wikipedia entities with their Wikidata descriptions on 7B–13B models, "
            "popularity from page views; here small models, references built from the shipped corpus and LRE "
            "data, and the source model's surprisal at the name as the popularity proxy (a weak stand-in: "
            "per-token surprisal favours long names whose later tokens are predictable)"
            + (
                f"; cross-model through the maps of {len(result['pairs'])} stated pairs."
                if not result["same_model"]
                else "."
            )
        )
        + verdict
        + "\n\n"
        + "\n".join(rows)
        + "\n"
    )
