"""A loaded graph's calls: typed errors instead of raw ones, and arity checked at load.

A crafted file can stay consistent module by module (each config fits its tensors, which
``from_state`` and the torch.nn field checks verify) and still not fit together: a conv
kernel reshaped to the same byte count, an embedding's table transposed, a layer whose
widths disagree with the next one's. Such a file loaded, then its first call raised a raw
``RuntimeError`` from deep inside torch. Two checks close that class:

* at load, :func:`check_call_arity`: every ``call_module`` node's arguments must bind to
  its module's ``forward`` (a node calling a linear with two inputs is refused, named);
* at every call, :class:`LoadedGraphModule` turns a raw exception from the graph into a
  typed one that names the file, the node and the module, and says whose fault it is. The
  file records each node's output shape and dtype at save time; the graph is run again on
  zero inputs at the recorded input shapes (under ``no_grad``, in eval mode, the caller's
  RNG untouched). If it fails there too, the file does not run at the shapes it declares:
  :class:`~fxpress.errors.ArtifactFormatError`, naming the first node whose output
  disagrees with its record (the transposed embedding, not the norm after it). If it runs
  there, the caller's inputs are what it does not take: :class:`~fxpress.errors.InputError`,
  with the shapes the file was saved for.

The fast path costs one ``try`` per call; the diagnosis runs only after a raw error.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx

from fxpress.errors import ArtifactFormatError, FxpressError, InputError
from fxpress.graph.artifact.values import _short_repr, escape_controls

#: node.meta key of the shape (None for a dynamic dimension) and dtype the file records
SAVED = "fxpress_saved"


def check_call_arity(gm: torch.fx.GraphModule, where: str) -> None:
    """Refuse a ``call_module`` node whose arguments do not bind to its module's forward."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        try:
            sig = inspect.signature(mod.forward)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            continue
        try:
            sig.bind(*node.args, **node.kwargs)
        except TypeError as e:
            raise ArtifactFormatError(
                f"{where}: node {node.name!r} calls module {node.target!r} "
                f"({type(mod).__name__}) with {len(node.args)} argument(s)"
                f"{' and keywords ' + str(sorted(node.kwargs)) if node.kwargs else ''}, which its "
                f"forward does not take ({e})") from None


def describe_node(node: torch.fx.Node, gm: torch.nn.Module) -> str:
    if node.op == "call_module":
        try:
            cls = type(gm.get_submodule(node.target)).__name__
        except AttributeError:
            cls = "?"
        return f"node {node.name!r} (module {node.target!r}, {cls})"
    if node.op in ("call_function", "call_method"):
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target))
        return f"node {node.name!r} ({target})"
    return f"node {node.name!r}"


def _shape_text(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    return type(v).__name__


def _saved_text(node: torch.fx.Node) -> str:
    shape, dtype = node.meta[SAVED]
    return f"{['?' if s is None else s for s in shape]} {str(dtype).removeprefix('torch.')}"


def _fits(v: Any, node: torch.fx.Node) -> bool:
    """Does ``v`` have the shape and dtype the file records for ``node`` (or none)?"""
    saved = node.meta.get(SAVED)
    if saved is None:
        return True
    shape, dtype = saved
    if not isinstance(v, torch.Tensor):
        return False
    return v.dtype == dtype and v.dim() == len(shape) and all(
        s is None or s == n for s, n in zip(shape, v.shape))


class _Failed(Exception):
    def __init__(self, node: torch.fx.Node, error: BaseException):
        super().__init__(str(error))
        self.node, self.error = node, error


class _Run(torch.fx.Interpreter):
    """Run the graph node by node, noting the first node whose output disagrees with the
    file's record while all its inputs agree with theirs (where the disagreement starts)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False
        self.origin: tuple[torch.fx.Node, Any] | None = None
        self.ok: set[torch.fx.Node] = set()

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - located, then reported typed
            raise _Failed(n, e) from None
        if _fits(out, n):
            self.ok.add(n)
        elif self.origin is None and all(a in self.ok for a in n.all_input_nodes):
            self.origin = (n, out)
        return out


def _zeros(node: torch.fx.Node, dims: dict) -> torch.Tensor | None:
    saved = node.meta.get(SAVED)
    if saved is None:
        return None
    shape, dtype = saved
    return torch.zeros([s if s is not None else max(2, dims.get(d, (2, None))[0])
                        for d, s in enumerate(shape)], dtype=dtype)


def _run_at_saved_shapes(gm: torch.fx.GraphModule) -> tuple[bool, _Failed | None, Any]:
    """Run ``gm`` on zeros at the input shapes the file records: (whether it could, the
    failure or None, the first node disagreeing with its record)."""
    from fxpress.graph.input_sizes import _sizes

    sizes = _sizes((getattr(gm, "meta", None) or {}).get("fxpress") or {})
    inputs = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            z = _zeros(n, sizes.get(len(inputs), {}))
            if z is None:
                return False, None, None
            inputs.append(z)
    modes = {m: m.training for m in gm.modules()}
    run = _Run(gm)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for m in modes:
                m.training = False
            try:
                run.run(*inputs, enable_io_processing=False)
            except _Failed as f:
                return True, f, run.origin
    finally:
        for m, t in modes.items():
            m.training = t
    return True, None, run.origin


def failing_node(gm: torch.fx.GraphModule, error: BaseException) -> torch.fx.Node | None:
    """The node whose generated line raised ``error`` (the graph's line-number map), from
    the error's traceback or, for an error of torch.compile's tracing, the stack it traced."""
    code = getattr(type(gm).forward, "__code__", None)
    lineno_map = getattr(gm, "_lineno_map", None)
    if code is None or not lineno_map:
        return None
    tb, line = error.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code is code:
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None:
        # an error of torch.compile's tracing: Dynamo keeps the user code's stack it traced
        # (``real_stack``, frame summaries), the graph's generated forward among them
        for frame in getattr(error, "real_stack", None) or ():
            if getattr(frame, "filename", None) == code.co_filename and frame.name == code.co_name:
                line = frame.lineno
    if line is None:
        return None
    index = lineno_map.get(line - code.co_firstlineno)
    nodes = list(gm.graph.nodes)
    return nodes[index] if index is not None and 0 <= index < len(nodes) else None


def error_text(error: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of a raw error, shortened, for a typed error's message."""
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {_short_repr(first[0] if first else '', limit)}"


def diagnose(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, error: Exception) -> FxpressError:
    """The typed error to raise for a raw ``error`` from a loaded graph's call."""
    where = getattr(gm, "fxpress_file", None) or "artifact"
    raw = error_text(error)
    failing = failing_node(gm, error)
    at = f" at {describe_node(failing, gm)}" if failing is not None else ""
    try:
        ran, failed, origin = _run_at_saved_shapes(gm)
    except Exception as e:  # noqa: BLE001 - the diagnosis must not replace the caller's error
        ran, failed, origin = False, None, None
        raw += f" (the shape check could not run: {type(e).__name__})"
    if failed is not None:
        first = str(failed.error).strip().splitlines()
        msg = f"{where}: the loaded graph fails{at} ({raw}), and on zero inputs at the shapes the file records too"
        if failed.node is not failing:
            msg += (f", at {describe_node(failed.node, gm)} ({type(failed.error).__name__}: "
                    f"{_short_repr(first[0] if first else '', 200)})")
        if origin is not None:
            node, out = origin
            msg += (f"; {describe_node(node, gm)} returns {_shape_text(out)} where the file records "
                    f"{_saved_text(node)}")
        return ArtifactFormatError(escape_controls(
            msg + ": the file's modules do not fit its graph (crafted or damaged); save the "
                  "model again with fxpress.save"))
    saved = [n for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get(SAVED)]
    shapes = ", ".join(f"{n.name} {_saved_text(n)}" for n in saved)
    return InputError(escape_controls(
        f"{where}: the loaded graph fails{at} on these inputs ({raw})"
        + (f"; it runs on inputs of the shapes and dtypes it was saved for ({shapes}): "
           "check your inputs' shapes, dtypes and values (token ids inside the vocabulary)"
           if ran else "")))


class LoadedGraphModule(torch.fx.GraphModule):
    """The class of a loaded graph: a raw exception from a call becomes a typed one
    (:func:`diagnose`). ``fxpress_file`` names the file in messages."""

    fxpress_file: str = "artifact"

    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._call_impl(*args, **kwargs)
        except FxpressError:
            raise
        except Exception as e:  # noqa: BLE001 - typed, named, cause kept
            raise diagnose(self, args, kwargs, e) from e


__all__ = ["LoadedGraphModule", "check_call_arity", "describe_node", "diagnose", "error_text",
           "failing_node", "SAVED"]
