"""The ``fxpress`` command.

    fxpress passes [--json]          every registered pass, its options and its plugin
    fxpress run RECIPE [--policy P]  run a TOML recipe, print the per-pass table
    fxpress --version

Exit codes: 0 ok, 1 verification failed, 2 bad input (recipe, options, model, plugin).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_VERIFY, EXIT_INPUT = 0, 1, 2


def _cmd_passes(args: argparse.Namespace) -> int:
    import fxpress

    reg = fxpress.registry()
    info = fxpress.list_passes()
    if args.json:
        print(json.dumps({"passes": info, "errors": [str(e) for e in reg.errors]}, indent=2,
                         default=str))
        return EXIT_OK
    for name, d in info.items():
        origin = d["plugin"] + (f" ({d['distribution']})" if d["distribution"] else "")
        tol = ", ".join(f"{k}={v:g}" for k, v in d["tolerance"].items())
        print(f"{name}  [{origin}]  {d['summary']}")
        print(f"    tolerance: {tol} (against {d['tolerance_against']})"
              + (f"; needs: {', '.join(d['needs'])}" if d["needs"] else ""))
        for opt, o in d["options"].items():
            choices = f" one of {o['choices']}" if o.get("choices") else ""
            print(f"    {opt} = {o['default']!r} ({o['type']}{choices})  {o['help']}")
    for e in reg.errors:
        print(f"warning: {e}", file=sys.stderr)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    import fxpress
    from fxpress.errors import InputError, PipelineSpecError

    pipe = fxpress.Pipeline.from_recipe(Path(args.recipe))
    recipe = pipe.recipe
    if args.policy:
        pipe.policy = args.policy
    make_model = recipe.resolve("model")
    if make_model is None:
        raise PipelineSpecError(f"recipe {args.recipe}: needs model = \"file.py:callable\"")
    torch.manual_seed(recipe.seed)
    model = make_model()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"recipe {args.recipe}: model callable returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    example = recipe.resolve("example_inputs")
    calibration = recipe.resolve("calibration")
    train_data = recipe.resolve("train_data")
    evaluate = recipe.resolve("evaluate")
    if recipe.description:
        print(recipe.description)
    before = evaluate(model) if evaluate else {}
    start = time.perf_counter()
    result = pipe.run(model, example() if example else None,
                      calibration=calibration() if calibration else None,
                      train_data=train_data() if train_data else None,
                      capture_method=recipe.capture, seed=recipe.seed)
    wall = time.perf_counter() - start
    after = evaluate(result.module) if evaluate else {}
    cap = result.capture
    print(f"captured with {cap.get('method')} ({cap.get('why', '')}); pipeline {result.pipeline}; "
          f"{wall:.2f} s")
    print(result.report())
    for k in before:
        print(f"{k}: {before[k]:.4f} before, {after.get(k, float('nan')):.4f} after")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {**result.as_dict(), "evaluate_before": before, "evaluate_after": after}, indent=2,
            default=str))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from fxpress import __version__

    p = argparse.ArgumentParser(prog="fxpress", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"fxpress {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sp = sub.add_parser("passes", help="list every registered pass")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=_cmd_passes)
    sr = sub.add_parser("run", help="run a TOML recipe and print the per-pass table")
    sr.add_argument("recipe")
    sr.add_argument("--policy", choices=("strict", "warn", "rollback"))
    sr.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    sr.set_defaults(func=_cmd_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fxpress.errors import FxpressError, VerificationError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_INPUT
    try:
        return args.func(args)
    except VerificationError as e:
        print(f"fxpress: verification failed: {e}", file=sys.stderr)
        if e.record is not None:
            print(f"  see the record of pass #{e.record.index}", file=sys.stderr)
        return EXIT_VERIFY
    except FxpressError as e:
        print(f"fxpress: error: {e}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
