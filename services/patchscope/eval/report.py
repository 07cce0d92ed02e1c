"""`docs/results.md`, rendered from the experiments' saved JSON: no number on the page is typed by hand.

Each section names the command that produced its numbers and states in one line how it differs from the
paper; a result that is missing says which command makes it. Sentences that compare methods are computed
from the same numbers (and say "nothing shown" where a Patchscope figure does not beat its control), so
they stay true when a rerun changes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from patchscope.eval.report_description import description_section
from patchscope.eval.report_format import _deviation, _mean, _pm, _share
from patchscope.eval.report_next_token import cross_model_section, next_token_section
from patchscope.eval.report_sections import attributes_section, multi_hop_section

HEADER = """# Results: the Patchscopes paper's experiments on the embedded models

Every table and plot here is written by `patchscope eval report` from the JSON files that the commands
named in each section save under `docs/results/`; every figure can be recomputed from the per-item
outcomes stored there. Models: SmolLM2-135M-Instruct (30 layers) and Gemma-3-270M (18 layers), float32 on
a shared 2-core CPU, so the sizes are small and stated with each figure (n, and a 95% Wilson interval for
shares or a bootstrap interval over items for means). Data: the WikiText-2 validation file and the LRE
relations packaged in `services/patchscope/data/`. `make eval` reruns all of it at the sizes shown here
(fits the eval's own maps per split seed, then every command below; section 7 gives each command's time
on this CPU). The sizes are small because the CPU was shared with other work; each section states the n
it rests on, and a section whose command has not been run at the current protocol says so instead of
showing old numbers.

**Controls beside every figure.** The *no-patch control* is the target prompt with its placeholder and
nothing patched; the *mean-state control* patches, at the placeholder, the target layer ℓ*'s mean state
over a fixed warm-up text (a state that holds no subject: what the prompt and the layer say on their
own); the *text-only* baseline is the target asked the same question with the source text in its
prompt; "same as unpatched" and "same as mean-state" are the shares of Patchscope answers identical to
those controls' answers. A Patchscope figure that does not beat its controls shows nothing, and the page
says so. Every experiment below carries both controls; the cross-model T = S reading (the source text as
the target's prompt) has the no-patch one only, since its mean-state control would need a row per position.

**Oracles** ("any pair") pick the layer pair after seeing the answers; they bound what a perfect choice
could do and are not achievable figures. The paper's §4.2 figure (mean over ℓ of "some ℓ* works") is
itself an oracle over ℓ*.
"""


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def comparison_table(folder: Path) -> str:
    """Paper figure | paper value | ours | same protocol?, filled from whichever results exist."""
    rows = ["| paper figure | paper value | ours | same protocol? |", "|---|---|---|---|"]
    ours = []
    for model in ("smollm2-135m", "gemma3-270m"):
        nt = _load(folder, f"next_token.{model}.{model}")
        if not (nt and "summary" in nt):
            continue
        pairs = nt["summary"]["pairs"]
        lens = {e["layer"]: e for e in nt["summary"]["layers"]}
        late = [p for p in pairs if p["source_layer"] >= len(pairs) // 2]
        wins = sum(p["patchscope"]["mean"] > lens[p["source_layer"]]["logit_lens"]["mean"] for p in late)
        ours.append(
            f"{model}: above at {wins} of {len(late)} upper layers ({len(nt['seeds'])} seeds, "
            f"n={nt['positions']} per layer)"
        )
    if ours:
        rows.append(
            "| §4.1 Fig. 2: token identity Patchscope vs logit lens, P@1 per layer | Patchscope above the "
            f"logit lens from the middle layers on | {'; '.join(ours)} | yes, at ℓ* = ℓ (smaller n; ridge "
            "tuned lens, not the paper's) |"
        )
    at = _load(folder, "attributes.smollm2-135m")
    if at and "all" in at and at["all"]["n"]:
        s = at["paper_tasks"] if at["paper_tasks"]["n"] else at["all"]
        rows.append(
            "| §4.2 Table 2: attribute extraction, Patchscope vs probe | Patchscope ahead of the probe on "
            "most of "
            f"12 tasks | paper's tasks here (n={s['n']}): Patchscope "
            f"{_mean(s['paper_mean_over_l_of_any_l_star'])}, probe {_mean(s['probe_mean_over_l'])}, "
            f"majority {_share(s['majority_class'])}"
            + (f", mean-state control {_share(s['mean_state_control'])}" if "mean_state_control" in s else "")
            + f"; sign test {s['vs_probe']['wins']} wins, "
            f"{s['vs_probe']['losses']} losses, p = {s['vs_probe']['p']:.3g} | partly (grid of layers, "
            "word-boundary rule, ≤ 6 samples per task) |"
        )
    for model, target in (
        ("smollm2-135m", "smollm2-135m"),
        ("gemma3-270m", "gemma3-270m"),
        ("smollm2-135m", "gemma3-270m"),
    ):
        de = _load(folder, f"description.{model}.{target}")
        if de and "popularity_proxy" in de:
            label = model if model == target else f"{model} → {target}"
            best = max(de["pairs"], key=lambda p: p["all"]["rouge_l"])
            rows.append(
                "| §4.3 Fig. 4: entity description ROUGE-L | Patchscope above the baselines in early-mid "
                "layers | "
                f"{label}: best pair {best['source_layer']} → {best['target_layer']} "
                f"{best['all']['rouge_l']:.3f} [{best['all']['ci'][0]:.2f}, {best['all']['ci'][1]:.2f}] "
                f"(n={best['all']['n']}), text-only "
                f"{de['text_only']['all']['rouge_l']:.3f}, no-patch "
                f"{de['no_patch_control']['all']['rouge_l']:.3f}"
                + (
                    f", mean-state at ℓ* = {best['target_layer']} "
                    f"{best['mean_state_control']['all']['rouge_l']:.3f}"
                    if "mean_state_control" in best
                    else ""
                )
                + " | "
                "partly (small models, references built from shipped data, a popularity proxy) |"
            )
    cm = _load(folder, "cross_model.smollm2-135m.gemma3-270m")
    if cm and "summary" in cm:
        best = max(cm["summary"]["pairs"], key=lambda p: p["patchscope"]["mean"])
        best_ts = max(cm["summary"]["pairs"], key=lambda p: p.get("same_prompt", {"mean": -1.0})["mean"])
        text = [r["text_only"]["p_at_1"] for r in cm["runs"] if "text_only" in r]
        text_k, text_n = sum(t["k"] for t in text), sum(t["n"] for t in text)
        same_prompt = (
            f"; T = S best {best_ts['source_layer']} → {best_ts['target_layer']}: "
            f"{_pm(best_ts['same_prompt'])}"
            if "same_prompt" in best_ts
            else ""
        )
        rows.append(
            "| §4.4 Fig. 10: cross-model next token (Vicuna 7B → 13B) | 0.5–0.8 P@1 on good pairs | identity "
            f"prompt best {best['source_layer']} → {best['target_layer']}: {_pm(best['patchscope'])}"
            f"{same_prompt}; text-only {text_k}/{text_n} ({len(cm['seeds'])} seeds, n={cm['positions']}) | "
            "no (not comparable: other models, tokenizers, maps) |"
        )
    mh = _load(folder, "multi_hop.smollm2-135m")
    if mh:
        if mh.get("evaluated") and isinstance(mh.get("vanilla"), dict):
            ours = (
                f"n={mh['evaluated']}: vanilla {_share(mh['vanilla'])}, step by step "
                f"{_share(mh['step_by_step'])}, best pair {_share(mh['patchscope_best_pair_accuracy'])}, "
                f"oracle {_share(mh['patchscope_oracle'])}, no-patch {_share(mh['no_patch_control'])}"
            )
        else:
            ours = "nothing evaluated"
        rows.append(
            "| §5 Table 3: multi-hop, CoT Patchscope vs vanilla and CoT | 19.6% → 50% (Vicuna 13B) | "
            f"{ours} | partly (S = π1 / T = π2, stated grid) |"
        )
    return "\n".join(rows) + "\n"


def calibration_section(path: Path) -> str:
    """The registered calibrators' held-out figures (`patchscope calibrations --json`, saved here)."""
    if not path.exists():
        return "Not run: `patchscope calibrations --json > docs/results/calibration.json` after `make run`.\n"
    rows = json.loads(path.read_text(encoding="utf-8"))
    lines = [
        "Each explanation's `confidence` comes from a logistic calibrator on its signals (patch effect, "
        "dependence, log-probability, same-as-unpatched, depths, map R²), fitted by `patchscope calibrate` "
        "on half the words (identity: corpus sentence prefixes) or subjects (attribute: LRE relations) and "
        "measured on the other half. AUROC 0.5 is chance; ECE is over 10 equal-width bins.\n",
        "| calibrator | held-out sites | right (base rate) | AUROC | ECE |",
        "|---|---|---|---|---|",
    ]
    for c in rows:
        lines.append(
            f"| {c['id']} | {c['examples_test']} | {c['accuracy_test']:.3f} | {c['auroc']:.3f} "
            f"| {c['ece']:.3f} |"
        )
    lines.append("")
    for c in rows:
        table = [r for r in json.loads(c["reliability"]) if r[2]]
        cells = ", ".join(
            f"{r[0]:.1f}–{r[1]:.1f}: n {r[2]}, conf. {r[3]:.2f}, acc. {r[4]:.2f}" for r in table
        )
        lines.append(f"- {c['id']} reliability: {cells}")
    weak = [c["id"] for c in rows if c["auroc"] < 0.7]
    if weak:
        lines.append(
            f"\nWeak (held-out AUROC < 0.7): {', '.join(weak)} — at these base rates and sizes the signals "
            "do not tell right attribute answers from wrong ones; read their confidence as the base rate."
        )
    return "\n".join(lines) + "\n"


def timings_section(path: Path) -> str:
    """Each eval command's wall time as `patchscope.eval.timed` recorded it, and their sum."""
    if not path.exists():
        return (
            "Not recorded: run the commands through `python -m patchscope.eval.timed` (`make eval` does).\n"
        )
    entries = json.loads(path.read_text(encoding="utf-8"))
    lines = [
        "| command | wall time | load average (start → end) | finished (UTC) |",
        "|---|---:|---|---|",
    ]
    for e in entries:
        failed = "" if e["status"] == 0 else f" (exit {e['status']})"
        if "--if-missing" in e["command"].split():
            failed += " (`--if-missing`: pairs already registered are not refitted)"
        lines.append(
            f"| `{e['command']}` | {e['wall_s'] / 60:.1f} min{failed} | {e['load_start']:.1f} → "
            f"{e['load_end']:.1f} | {e['finished']} |"
        )
    total = sum(e["wall_s"] for e in entries)
    cpus = sorted({e["cpus"] for e in entries})
    covered = {stem for e in entries for stem in e.get("wrote", [])}
    earlier = []
    for result in sorted(path.parent.glob("*.json")):
        if result.name in (path.name, "calibration.json") or result.stem in covered:
            continue
        seconds = json.loads(result.read_text(encoding="utf-8")).get("seconds", float("nan"))
        earlier.append(f"`{result.stem}` {seconds / 60:.1f} min")
    if earlier:
        lines.append(
            "\nRun before times were recorded (their time inside the process, from their JSON): "
            + ", ".join(earlier)
            + "."
        )
    return (
        f"The commands below took **{total / 60:.0f} min** of wall time in all on this "
        f"{'/'.join(map(str, cpus))}-CPU machine, shared with other work (the load average says how "
        "much); each section's own `seconds` in its JSON is the run's time inside the process.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def write_report(folder: Path, page: Path) -> Path:
    """Render the page from `folder`'s results; plots are linked relative to the page."""
    rel = folder.relative_to(page.parent) if folder.is_relative_to(page.parent) else folder
    parts = [HEADER]

    def picture(name: str, alt: str) -> str:
        return f"\n![{alt}]({rel / (name + '.png')})\n" if (folder / f"{name}.png").exists() else ""

    parts.append("\n## The paper's figures beside ours\n\n")
    parts.append(comparison_table(folder))
    parts.append("\n## 1. Next token from intermediate layers (§4.1)\n\n")
    parts.append(
        _deviation(
            "the reference is the model's own final-layer prediction at a random position of a held-out "
            "sentence; the identity prompt `cat -> cat; 1135 -> 1135; hello -> hello; ?` at ℓ* = ℓ; the "
            "tuned "
            "lens is a **least-squares (ridge)** affine map per layer to the last layer, fitted on other "
            "documents, not the paper's tuned lens (which is trained with a KL objective); surprisal as the "
            "paper defines it (−ln p^L of the reader's top-1), the other surprisal kept in the JSON as "
            "`reference_surprisal_bits`."
        ).rstrip()
        + "\n"
    )
    for model in ("smollm2-135m", "gemma3-270m"):
        name = f"next_token.{model}.{model}"
        parts.append(f"\n### {model} → itself\n\n")
        parts.append(next_token_section(_load(folder, name), f"patchscope eval next-token --source {model}"))
        parts.append(picture(name, f"next token, {model}"))
    parts.append("\n## 2. Attribute extraction (§4.2)\n\n")
    name = "attributes.smollm2-135m"
    parts.append(attributes_section(_load(folder, name), "patchscope eval attributes --model smollm2-135m"))
    parts.append(picture(name, "attribute extraction per layer"))
    parts.append("\n## 3. Entity description (§4.3)\n")
    for source, target in (
        ("smollm2-135m", "smollm2-135m"),
        ("gemma3-270m", "gemma3-270m"),
        ("smollm2-135m", "gemma3-270m"),
    ):
        name = f"description.{source}.{target}"
        command = f"patchscope eval description --source {source}" + (
            f" --target {target}" if target != source else ""
        )
        parts.append(f"\n### {source} → {target}\n\n")
        parts.append(description_section(_load(folder, name), command))
        parts.append(picture(name, f"entity description {source} -> {target}"))
    parts.append("\n## 4. Cross-model patching (§4.4)\n\n")
    name = "cross_model.smollm2-135m.gemma3-270m"
    parts.append(
        cross_model_section(
            _load(folder, name), "patchscope eval cross-model --source smollm2-135m --target gemma3-270m"
        )
    )
    parts.append(picture(name, "cross-model next token per layer pair"))
    parts.append("\n## 5. Multi-hop self-correction (§5)\n\n")
    name = "multi_hop.smollm2-135m"
    parts.append(multi_hop_section(_load(folder, name), "patchscope eval multi-hop --model smollm2-135m"))
    parts.append(picture(name, "CoT Patchscope accuracy per layer pair"))
    parts.append("\n## 6. Faithfulness: confidence calibrators\n\n")
    parts.append(calibration_section(folder / "calibration.json"))
    parts.append("\n## 7. Run times\n\n")
    parts.append(timings_section(folder / "timings.json"))
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("".join(parts), encoding="utf-8")
    return page
