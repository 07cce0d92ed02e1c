"""`patchscope calibrate` and `patchscope calibrations`: confidence for explanations, fitted and listed."""

from __future__ import annotations

import argparse
import json


def cmd_calibrate(args: argparse.Namespace) -> int:
    from patchscope.calibration.calibrate import calibrate
    from patchscope.calibration.registry import CalibrationRegistry, calibrator_id
    from patchscope.cli.args import progress
    from patchscope.cli.models import registry_with_paths
    from patchscope.data import data_root
    from patchscope.engine import load_model
    from patchscope.engine.runtime import TargetRuntime
    from patchscope.explain.local import model_info
    from patchscope.mapping.registry import MappingRegistry

    models = registry_with_paths(args.source, args.target)
    source = load_model(args.source, registry=models, progress=progress)
    target = (
        source if args.target == args.source else load_model(args.target, registry=models, progress=progress)
    )
    last = [-1]

    def step(done: int, total: int) -> None:
        percent = 100 * done // max(1, total)
        if percent >= last[0] + 10:
            last[0] = percent
            progress(f"calibrate {args.preset}: {percent}%")

    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    mappings = MappingRegistry(args.registry)
    calibrations = CalibrationRegistry(mappings.root)
    runtime = TargetRuntime.build(target)
    infos = (model_info(source), model_info(target)) if args.if_missing else None  # one forward each
    for preset in presets:
        if infos is not None and calibrations.lookup(*infos, preset) is not None:
            progress(f"{calibrator_id(source.id, target.id, preset)} is registered already")
            continue
        report = calibrate(
            source,
            runtime,
            preset,
            mappings,
            data_root(),
            examples=args.examples,
            seed=args.seed,
            progress=step,
        )
        _print(report.info, report.path)
    return 0


def _print(i, path) -> None:
    print(f"{i.id}: {i.data}")
    print(
        f"held-out sites {i.examples_test} (train {i.examples_train}), right {i.accuracy_test:.3f}; "
        f"AUROC {i.auroc:.3f}, ECE {i.ece:.3f}"
    )
    print(f"{'bin':<12}{'n':>6}{'confidence':>12}{'accuracy':>10}")
    for low, high, count, confidence, accuracy in json.loads(i.reliability):
        if count:
            print(f"{f'{low:.1f}-{high:.1f}':<12}{count:>6}{confidence:>12.3f}{accuracy:>10.3f}")
    print(f"written to {path}")


def cmd_calibrations(args: argparse.Namespace) -> int:
    from patchscope.calibration.registry import CalibrationRegistry
    from patchscope.mapping.registry import MappingRegistry

    registry = CalibrationRegistry(MappingRegistry(args.registry).root)
    listing = registry.scan()
    if args.json:
        print(json.dumps([c.__dict__ for c in listing.calibrators], indent=2))
        return 0
    print(f"{'id':<52}{'n test':>8}{'right':>8}{'AUROC':>8}{'ECE':>8}")
    for c in listing.calibrators:
        print(f"{c.id:<52}{c.examples_test:>8}{c.accuracy_test:>8.3f}{c.auroc:>8.3f}{c.ece:>8.3f}")
    for name, problem in listing.unreadable:
        print(f"unreadable: {name}: {problem}")
    print(f"registry: {registry.root}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser(
        "calibrate", help="fit and register a confidence calibrator for a model pair and preset"
    )
    cal.add_argument("--source", required=True, help="source model id")
    cal.add_argument("--target", required=True, help="target model id (same as --source for same-model)")
    cal.add_argument("--preset", default="identity", help="identity, attribute, or both: identity,attribute")
    cal.add_argument("--examples", type=int, default=120, help="labelled items (× layer pairs = sites)")
    cal.add_argument("--seed", type=int, default=0, help="item sampling and the train/test split")
    cal.add_argument(
        "--registry", default=None, help="mapping registry (calibrators live in its calibrations/)"
    )
    cal.add_argument(
        "--if-missing", action="store_true", help="skip presets with a calibrator for these models"
    )
    cal.set_defaults(func=cmd_calibrate)

    ls = sub.add_parser("calibrations", help="list registered calibrators with their held-out figures")
    ls.add_argument("--registry", default=None, help="mapping registry directory")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_calibrations)
