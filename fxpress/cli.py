"""The ``fxpress`` command.

    fxpress passes [--json]          every registered pass, its options and its plugin
    fxpress run RECIPE [--policy P] [--in-place]
                                     run a TOML recipe, print the per-pass table, save `output`
    fxpress inspect MODEL            per-layer table of an artifact (or file.py:callable)
    fxpress diff A B                 what changed between two artifacts/models
    fxpress report ARTIFACT -o F     one self-contained HTML page about an artifact
    fxpress export-onnx ARTIFACT -o F.onnx
                                     the compressed model for ONNX Runtime (fxpress[onnx])
    fxpress --version

Exit codes: 0 ok, 1 verification failed, 2 bad input (recipe, options, model, plugin).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_VERIFY, EXIT_INPUT = 0, 1, 2


#: a pass with an ``include`` option takes per-layer rules (passes/layer_rules.py)
LAYERS_HELP = ("layers = {} (rules)  per-layer options: layers={\"glob\"={option=value,...}} sets "
               "options on the layers a glob (or re:regex) over layer or weight names matches; "
               "later rules win")


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
        if "include" in d["options"]:  # per-layer rules restrict the pass with include
            print(f"    {LAYERS_HELP}")
    for e in reg.errors:
        print(f"warning: {e}", file=sys.stderr)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    import fxpress
    from fxpress.errors import InputError, PipelineSpecError

    pipe = fxpress.Pipeline.from_recipe(Path(args.recipe))
    recipe = pipe.recipe
    if args.pipeline:  # pipeline text or a built-in recipe name instead of the recipe's passes
        pipe.passes = fxpress.Pipeline.parse(args.pipeline).passes
    if args.policy:
        pipe.policy = args.policy
    if args.in_place:
        pipe.in_place = True
    output = Path(args.output) if args.output else recipe.output_path()
    if output is not None:  # a path no file can have is refused before the run, not after it
        from fxpress.graph.artifact.format import as_path

        output = as_path(output, "write")
    files = _recipe_files(recipe)
    try:
        refuse_overwriting_inputs({"--json": args.json}, {**files, "output": output})
    except InputError:
        args.json = None  # the failure's outcome is not written there either
        raise
    refuse_overwriting_inputs({"output": output}, files)
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
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        size = fxpress.save(result, output, entropy=args.entropy or recipe.entropy,
                            report={"evaluate_before": before, "evaluate_after": after})
        print(f"saved {output} ({size:,} bytes; captured graph {result.original_disk_bytes:,} bytes)")
    if args.json:
        _write_json(args.json, {"status": "ok", "exit_code": EXIT_OK, **result.as_dict(),
                                "evaluate_before": before, "evaluate_after": after})
    return EXIT_OK


def _file_id(path: Any, replaced: bool) -> str:
    """Which file ``path`` names: the file read through any symbolic link, or, for a path
    written (``replaced``), the name in its real folder (a write replaces a link there,
    never the file it points to)."""
    path = Path(path)
    if replaced:
        return os.path.join(os.path.realpath(path.parent if str(path.parent) else "."), path.name)
    return os.path.realpath(path)


def refuse_overwriting_inputs(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """An :class:`~fxpress.errors.InputError` (exit code 2) when an output path of a
    command names one of the files it reads: ``fxpress report a.fxp -o a.fxp`` and
    ``fxpress run r.toml -o r.toml`` replaced the artifact or the recipe with their
    output (exit 0). ``outputs`` / ``inputs``: what each path is -> the path (None
    skipped)."""
    from fxpress.errors import InputError

    read = {}
    for what, path in inputs.items():
        if path is not None:
            for replaced in (False, True):  # the file, and a link to it that the write would replace
                read.setdefault(_file_id(path, replaced), (what, path))
    for what, path in outputs.items():
        if path is None or path is True:
            continue
        hit = read.get(_file_id(path, True))
        if hit is not None:
            raise InputError(f"{what} {path} is also the command's {hit[0]} ({hit[1]}): "
                             f"writing it would replace that file; give another path")


def _recipe_files(recipe: Any) -> dict[str, Path]:
    """The recipe and the Python files its ``file.py:callable`` references name."""
    out: dict[str, Path] = {"recipe": recipe.path}
    for key in ("model", "example_inputs", "calibration", "train_data", "evaluate"):
        ref = getattr(recipe, key, None)
        if isinstance(ref, str) and ":" in ref and ref.rpartition(":")[0].endswith(".py"):
            out[f"recipe's {key} file"] = recipe.base_dir / ref.rpartition(":")[0]
    return out


def _write_json(path: str, data: dict) -> None:
    from fxpress.graph.artifact import write_atomic

    write_atomic(path, json.dumps(data, indent=2, default=str).encode())


def _failure_json(e: BaseException, code: int) -> dict:
    """What ``--json`` holds when a command fails: the outcome, the error and, for a
    verification failure, the failing pass's full record (every metric it missed)."""
    out: dict = {"status": "verification_failed" if code == EXIT_VERIFY else "error",
                 "exit_code": code, "error": {"type": type(e).__name__, "message": str(e)}}
    record = getattr(e, "record", None)
    if record is not None:
        out["failed_record"] = record.as_dict()
    return out


def _open(ref: str):
    """(graph, header) of an artifact path or a ``file.py:callable`` returning a module."""
    import torch

    import fxpress
    from fxpress.errors import InputError
    from fxpress.graph import artifact

    p = Path(ref)
    if p.exists():  # a folder, FIFO or device is refused by load as not a regular file
        return fxpress.load(p), artifact.read_header(p)
    if ":" not in ref:
        raise InputError(f"{ref}: no such file; give an artifact path or file.py:callable")
    from fxpress.passes.recipes import load_reference

    made = load_reference(ref, Path.cwd(), "model")()
    if isinstance(made, torch.fx.GraphModule):
        gm = made
    elif isinstance(made, torch.nn.Module):
        try:
            gm = torch.fx.symbolic_trace(made)
            gm.meta["fxpress"] = {"method": "fx (symbolic_trace, for inspection only)"}
        except Exception as e:
            raise InputError(f"{ref}: symbolic tracing failed ({type(e).__name__}: {e}); capture "
                             "it with inputs and save an artifact, then inspect that") from None
    else:
        raise InputError(f"{ref}: returned {type(made).__name__}, not a torch.nn.Module")
    return gm, artifact.artifact_header(gm)


def _safe(text: str) -> str:
    """``text`` with control characters escaped (newlines kept): what a file names (a layer,
    a pass, a capture method) cannot drive the terminal."""
    from fxpress.graph.artifact.values import escape_controls

    return "\n".join(escape_controls(line) for line in str(text).split("\n"))


def _reads_artifacts(command):
    """A command that opens artifacts: whatever a bad file makes go wrong ends as one line
    (an ``FxpressError``, control characters escaped), never a traceback."""
    import functools

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from fxpress.errors import ArtifactError, FxpressError, InputError
        from fxpress.graph.artifact.values import escape_controls

        try:
            return command(args)
        except ArtifactError as e:
            msg = escape_controls(str(e))
            if msg == str(e):
                raise
            raise type(e)(msg) from None
        except FxpressError as e:
            if escape_controls(str(e)) == str(e):
                raise
            raise InputError(escape_controls(str(e))) from None
        except (BrokenPipeError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise InputError(escape_controls(f"{type(e).__name__}: {e}")) from None

    return run


@_reads_artifacts
def _cmd_inspect(args: argparse.Namespace) -> int:
    from fxpress.graph.inspect import format_layers, layers, to_networkx, to_node_link

    from fxpress.passes.decode import decode_plan, format_decode_plan

    refuse_overwriting_inputs({"--graphml": args.graphml, "--dot": args.dot,
                               "--node-link": args.node_link},
                              {"model": args.model.rpartition(":")[0]
                               if args.model.rpartition(":")[0].endswith(".py") else args.model})
    gm, header = _open(args.model)
    rows = layers(gm, header)
    plan = decode_plan(gm)  # how each compressed layer runs, and the memory it holds
    if args.json:
        print(json.dumps({"file_bytes": header.get("file_bytes"), "layers": [r.as_dict() for r in rows],
                          "decode": plan, "graph": to_node_link(to_networkx(gm))},
                         indent=1, default=str))
        return EXIT_OK
    meta = header.get("meta") or {}
    passes = meta.get("passes", [])
    passes = ", ".join(str(p) for p in passes) if isinstance(passes, list) else str(passes)
    print(_safe(f"{args.model}: {header.get('file_bytes', 0):,} bytes; captured with "
                f"{meta.get('method') or 'no fxpress capture'}; passes: {passes or 'none'}"))
    print(_safe(format_layers(rows, header.get("file_bytes"))))
    if plan:
        print("\nrun time (decode strategy per compressed layer; bytes held beyond the stored "
              "tensors, now and by each strategy; fxpress.set_decode changes it):")
        print(_safe(format_decode_plan(plan)))
    for what, writer in (("graphml", "write_graphml"), ("dot", "write_dot"),
                         ("node_link", "write_node_link")):
        dest = getattr(args, what)
        if dest:
            import fxpress.graph.inspect as gi

            getattr(gi, writer)(to_networkx(gm), dest)
            print(f"wrote {dest}")
    return EXIT_OK


@_reads_artifacts
def _cmd_diff(args: argparse.Namespace) -> int:
    from fxpress.graph.inspect import diff

    a, _ = _open(args.a)
    b, _ = _open(args.b)
    d = diff(a, b)
    print(json.dumps(d.as_dict(), indent=1, default=str) if args.json else _safe(str(d)))
    return EXIT_OK


@_reads_artifacts
def _cmd_report(args: argparse.Namespace) -> int:
    from fxpress.graph.inspect import layer_summary
    from fxpress.report import render_report

    refuse_overwriting_inputs({"-o": args.output}, {"artifact": args.result, "--before": args.before})
    gm, header = _open(args.result)
    before = None
    if args.before:
        before = layer_summary(_open(args.before)[0])
    from fxpress.graph.artifact import write_atomic

    out = Path(args.output)
    write_atomic(out, render_report(gm, header, title=Path(args.result).name, before=before).encode())
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return EXIT_OK


@_reads_artifacts
def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from fxpress.errors import InputError
    from fxpress.onnx_export import export_onnx

    refuse_overwriting_inputs({"-o": args.output}, {"artifact": args.artifact})
    src = Path(args.artifact)
    if not src.exists():
        raise InputError(f"{args.artifact}: no such artifact file")
    out = export_onnx(src, Path(args.output), fuse=not args.no_fuse,
                      accuracy_level=args.accuracy_level, skip_padding=not args.keep_padding)
    print(out.summary())
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
    sr.add_argument("--pipeline", metavar="TEXT",
                    help="run this pipeline text, or a built-in recipe such as deep-compression, "
                         "instead of the recipe's passes (model and data still come from it)")
    sr.add_argument("--in-place", action="store_true",
                    help="rewrite one graph instead of a copy per pass: a weight copy less "
                         "in memory, no rollback")
    sr.add_argument("--json", metavar="FILE", help="also write the records as JSON")
    sr.add_argument("-o", "--output", help="save the artifact here (default: the recipe's output)")
    sr.add_argument("--entropy", action="store_true", help="entropy-code index/bitmap streams")
    sr.set_defaults(func=_cmd_run)
    si = sub.add_parser("inspect", help="per-layer table: params, sparsity, bits, bytes, share")
    si.add_argument("model", help="an artifact, or file.py:callable returning a module")
    si.add_argument("--json", action="store_true", help="layers and the node-link graph as JSON")
    si.add_argument("--graphml", metavar="FILE", help="also write GraphML (Gephi, yEd)")
    si.add_argument("--dot", metavar="FILE", help="also write Graphviz DOT")
    si.add_argument("--node-link", dest="node_link", metavar="FILE", help="also write node-link JSON")
    si.set_defaults(func=_cmd_inspect)
    sd = sub.add_parser("diff", help="added/removed/changed nodes and rewired edges")
    sd.add_argument("a")
    sd.add_argument("b")
    sd.add_argument("--json", action="store_true")
    sd.set_defaults(func=_cmd_diff)
    sp2 = sub.add_parser("report", help="one self-contained HTML page about an artifact")
    sp2.add_argument("result", help="an artifact (fxpress run with output embeds its records)")
    sp2.add_argument("-o", "--output", required=True, metavar="HTML")
    sp2.add_argument("--before", help="compare with this artifact instead of the embedded baseline")
    sp2.set_defaults(func=_cmd_report)
    so = sub.add_parser("export-onnx", help="export an artifact to ONNX for ONNX Runtime "
                        "(int8 as MatMulInteger, 4-bit groups as MatMulNBits); needs fxpress[onnx]")
    so.add_argument("artifact")
    so.add_argument("-o", "--output", required=True, metavar="ONNX")
    so.add_argument("--no-fuse", action="store_true",
                    help="skip ONNX Runtime's offline transformer fusions")
    so.add_argument("--accuracy-level", type=int, default=0, choices=range(5),
                    help="MatMulNBits compute type for 4-bit layers: 0 float (exact), 4 int8 "
                         "(faster, less faithful)")
    so.add_argument("--keep-padding", action="store_true",
                    help="run every token, pad tokens too (by default per-token layers skip the "
                         "attention mask's pad tokens where no output reads them)")
    so.set_defaults(func=_cmd_export_onnx)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from fxpress.errors import FxpressError, VerificationError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_INPUT
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe (``fxpress passes | head``) shows up here
        return code
    except BrokenPipeError:
        return _closed_stdout()
    except VerificationError as e:
        print(f"fxpress: verification failed: {e}", file=sys.stderr)
        if e.record is not None:
            from fxpress.passes.records import format_records

            print(f"the record of pass #{e.record.index}:", file=sys.stderr)
            print(format_records([e.record], 0), file=sys.stderr)
        _json_outcome(args, _failure_json(e, EXIT_VERIFY))
        return EXIT_VERIFY
    except FxpressError as e:
        print(f"fxpress: error: {e}", file=sys.stderr)
        _json_outcome(args, _failure_json(e, EXIT_INPUT))
        return EXIT_INPUT


def _json_outcome(args: argparse.Namespace, data: dict) -> None:
    """``--json FILE`` (run) gets the outcome written; ``--json`` (a flag) prints it."""
    from fxpress.errors import ArtifactError

    dest = getattr(args, "json", None)
    if not dest:
        return
    try:
        if dest is True:
            print(json.dumps(data, indent=2, default=str))
        else:
            _write_json(dest, data)
    except (OSError, BrokenPipeError, ArtifactError) as e:
        print(f"fxpress: cannot write the --json outcome: {e}", file=sys.stderr)


def _closed_stdout() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as Unix tools do."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail
    except (OSError, ValueError):
        pass
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
