"""Shape checks for LSTMs in loaded artifacts: torch's CPU LSTM kernel checks no shapes.

``aten.lstm`` on CPU runs oneDNN's LSTM, which reads every weight, the input and the states
at the sizes it derives from other tensors, without comparing them (torch 2.13: a 2-row
``weight_hh`` for a 16-unit LSTM, or a 64-feature input to an 8-feature LSTM, computes on
heap memory past the tensors and returns NaNs). ``nn.LSTM.forward`` compares its input and
states with its fields, but not its weights with its fields. GRU and the plain RNNs compute
with checked matmuls, and the cells check their shapes.

So a file cannot make an LSTM read past its tensors:

- :func:`check_rnn_module`: an ``nn.LSTM`` / ``GRU`` / ``RNN`` from a file has each weight
  at the shape its fields give; :func:`check_rnn_tree`: an empty weight is a placeholder
  for one stored compressed by the :class:`~fxpress.graph.fused.FusedCall` around it, whose
  child must decode to that shape;
- :func:`guard_lstm_calls`: before every ``aten.lstm`` (or ``torch.lstm``) call of a loaded
  graph the loader inserts a call of :func:`check_lstm_call`, which compares the input, the states and every
  weight at each call (a few integer comparisons). The writer never stores these guards.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from fxpress.errors import ArtifactFormatError, InputError

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def rnn_weight_shapes(gates: int, input_size: int, hidden_size: int, proj_size: int,
                      num_layers: int, bidirectional: bool, bias: bool) -> dict[str, tuple[int, ...]]:
    """Each weight of a torch RNN (``weight_ih_l0``, ..., ``_reverse``) -> its shape."""
    real_hidden = proj_size if proj_size > 0 else hidden_size
    directions = 2 if bidirectional else 1
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(num_layers):
        width = input_size if layer == 0 else real_hidden * directions
        for direction in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            out["weight_ih" + sfx] = (gates * hidden_size, width)
            out["weight_hh" + sfx] = (gates * hidden_size, real_hidden)
            if bias:
                out["bias_ih" + sfx] = out["bias_hh" + sfx] = (gates * hidden_size,)
            if proj_size > 0:
                out["weight_hr" + sfx] = (proj_size, hidden_size)
    return out


def _module_shapes(m: torch.nn.RNNBase) -> dict[str, tuple[int, ...]]:
    fields = (m.input_size, m.hidden_size, m.proj_size, m.num_layers)
    if m.mode not in _GATES or not all(isinstance(v, int) and not isinstance(v, bool)
                                       for v in fields) or min(fields) < 0 or min(fields[:2]) < 1:
        raise ArtifactFormatError(f"{type(m).__name__}: mode={m.mode!r}, input_size, hidden_size, "
                                  "proj_size and num_layers do not describe an RNN")
    return rnn_weight_shapes(_GATES[m.mode], m.input_size, m.hidden_size, m.proj_size,
                             m.num_layers, bool(m.bidirectional), bool(m.bias))


def check_rnn_module(m: torch.nn.RNNBase, where: str) -> None:
    """Refuse an RNN module whose weights do not have the shapes its fields give (an empty
    weight is a placeholder for a compressed one: see :func:`check_rnn_tree`)."""
    for name, shape in _module_shapes(m).items():
        p = m._parameters.get(name)
        if p is not None and p.numel() != 0 and tuple(p.shape) != shape:
            raise ArtifactFormatError(f"{where}: {type(m).__name__} weight {name!r} is "
                                      f"{tuple(p.shape)}, its fields give {shape}")


def check_rnn_tree(root: torch.nn.Module, where: str) -> None:
    """Every RNN of a loaded module tree: each weight left empty (a placeholder) must be
    stored compressed by the :class:`~fxpress.graph.fused.FusedCall` around it, as a child
    that decodes to the shape the RNN's fields give (the kernel would read past it)."""
    from fxpress.graph.fused import FusedCall

    covered: dict[tuple[int, str], Any] = {}
    for call in root.modules():
        host = call._modules.get("host") if isinstance(call, FusedCall) else None
        if not isinstance(host, torch.nn.Module) or not isinstance(call.weights, dict):
            continue
        for child, name in call.weights.items():
            owner_path, _, attr = str(name).rpartition(".")
            try:
                owner = host.get_submodule(owner_path)
            except AttributeError:
                continue  # FusedCall.decoded refuses it at the first call
            covered[(id(owner), attr)] = call._modules.get(str(child))
    for path, m in root.named_modules():
        if not isinstance(m, torch.nn.RNNBase):
            continue
        for name, shape in _module_shapes(m).items():
            p = m._parameters.get(name)
            if p is None or p.numel() != 0:
                continue
            child = covered.get((id(m), name))
            stored = getattr(child, "shape", None)
            if not isinstance(stored, (list, tuple)) or tuple(stored) != shape:
                raise ArtifactFormatError(
                    f"{where}: module {path!r}: {type(m).__name__} weight {name!r} is empty and "
                    + ("stored by no compressed module" if child is None else
                       f"stored compressed as {stored}") + f"; its fields give {shape}")


# -- aten.lstm in loaded graphs ---------------------------------------------------------------

def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _packed_batch(batch_sizes: Any, rows: int) -> int | str:
    """The first batch size of a packed sequence whose ``rows`` rows ``batch_sizes``
    describes, or what is wrong with it: the kernel steps through the data and the states
    by these sizes unchecked (a first size past the states' batch corrupted the heap)."""
    bs = batch_sizes
    if not isinstance(bs, torch.Tensor) or bs.dtype != torch.int64 or bs.dim() != 1 \
            or bs.device.type != "cpu" or not 1 <= bs.numel() <= max(rows, 1):
        return f"batch_sizes {_short(bs)} is not a 1-D int64 CPU tensor of 1..{rows} sizes"
    if not bool((bs >= 1).all()) or not bool((bs[1:] <= bs[:-1]).all()) or int(bs.sum()) != rows:
        return (f"batch_sizes {_short(bs)} are not positive, non-increasing sizes adding up to "
                f"the data's {rows} rows (a packed sequence's)")
    return int(bs[0])


def _short(t: Any) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_lstm_call(packed: bool, input: Any, hx: Sequence[Any], params: Sequence[Any],
                    has_biases: bool, num_layers: int, bidirectional: bool,
                    batch_first: bool = False, batch_sizes: Any = None) -> None:
    """Raise :class:`~fxpress.errors.InputError` unless the arguments of an
    ``aten.lstm`` call have consistent shapes (``packed``: its ``data`` overload, whose
    ``input`` is a packed sequence's 2-D data, in steps of ``batch_sizes``)."""
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    problem = None
    if not isinstance(num_layers, int) or num_layers < 1 or not isinstance(hx, (list, tuple)) \
            or not isinstance(params, (list, tuple)) or len(hx) != 2 or not all(
            isinstance(t, torch.Tensor) for t in (input, *hx, *params)):
        problem = "num_layers, hx or params are not an LSTM's"
    elif packed:
        first = _packed_batch(batch_sizes, input.shape[0] if input.dim() == 2 else -1)
        problem = first if isinstance(first, str) else None
    elif len(params) not in (num_layers * directions * per, num_layers * directions * (per + 1)):
        problem = f"{len(params)} weights for {num_layers} layer(s) x {directions} direction(s)"
    if problem is None:
        proj = len(params) != num_layers * directions * per
        h, c = hx
        hidden = c.shape[-1] if c.dim() else -1
        real = h.shape[-1] if h.dim() else -1
        width = input.shape[-1] if input.dim() in ((2,) if packed else (2, 3)) else -1
        if packed:
            state: tuple = (num_layers * directions, first)
        elif input.dim() == 3:
            state = (num_layers * directions, input.shape[0] if batch_first else input.shape[1])
        else:
            state = (num_layers * directions,)
        w_ih0 = _shape(params[0])
        if not proj and real != hidden:
            problem = f"h has {real} features and c {hidden}, without a projection"
        elif width < 0 or w_ih0 is None or len(w_ih0) != 2 or width != w_ih0[1]:
            problem = f"the input's {width} features do not fit weight_ih_l0 {w_ih0}"
        elif _shape(h) != (*state, real) or _shape(c) != (*state, hidden):
            problem = f"states {_shape(h)} / {_shape(c)} do not fit {state} x {real} / {hidden}"
        else:
            want = list(rnn_weight_shapes(4, width, hidden, real if proj else 0, num_layers,
                                          directions == 2, bool(has_biases)).values())
            got = [_shape(p) for p in params]
            if got != want:
                problem = f"weights {got} do not have the shapes {want}"
    if problem is not None:
        raise InputError(f"aten.lstm: {problem}; an LSTM computes only on consistent "
                              "shapes (torch's CPU kernel does not check them)")


def fxpress_lstm_guard(*args: Any, **kwargs: Any) -> None:
    """What the loader calls before each ``aten.lstm`` call: :func:`check_lstm_call`; with
    ``args`` (the call's own, positional or not), before a ``torch.lstm`` call, whose
    overload (a padded or a packed input) shows only at run time, as it does to torch: a
    tensor second argument, or ``batch_sizes`` or ``data`` by name, is a packed one."""
    if args or "packed" not in kwargs:
        packed = (len(args) > 1 and isinstance(args[1], torch.Tensor)) or "batch_sizes" in kwargs \
            or "data" in kwargs
        op = torch.ops.aten.lstm.data if packed else torch.ops.aten.lstm.input
        bound = dict(zip((a.name for a in op._schema.arguments), args))
        bound.update(kwargs)
        if packed:
            bound["input"] = bound.pop("data", None)
        kwargs = {"packed": packed, **{k: bound[k] for k in _GUARD_ARGS if k in bound}}
    try:
        check_lstm_call(**kwargs)
    except InputError:
        raise
    except TypeError as e:  # an argument missing or of another kind: the call is no LSTM's
        raise InputError(f"aten.lstm: its arguments are not an LSTM's ({e})") from None


torch.fx.node.has_side_effect(fxpress_lstm_guard)  # dead-code elimination keeps it

LSTM_OPS = (torch.ops.aten.lstm.input, torch.ops.aten.lstm.data)
_GUARD_ARGS = ("input", "hx", "params", "has_biases", "num_layers", "bidirectional", "batch_first",
               "batch_sizes")


def guard_lstm_calls(graph: torch.fx.Graph) -> None:
    """Insert a :func:`fxpress_lstm_guard` call before every ``aten.lstm`` or ``torch.lstm``
    call of ``graph`` (an fx graph calls the same kernel through the torch function; ATen
    arguments were checked against the op's schema when the graph was read)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.lstm:
            with graph.inserting_before(node):
                graph.call_function(fxpress_lstm_guard, node.args, dict(node.kwargs))
            continue
        if node.op != "call_function" or node.target not in LSTM_OPS:
            continue
        bound = dict(zip((a.name for a in node.target._schema.arguments), node.args))
        bound.update(node.kwargs)
        if node.target is torch.ops.aten.lstm.data:
            bound["input"] = bound.pop("data", None)
        kwargs = {k: bound[k] for k in _GUARD_ARGS if k in bound}
        with graph.inserting_before(node):
            graph.call_function(fxpress_lstm_guard,
                                kwargs={"packed": node.target is torch.ops.aten.lstm.data, **kwargs})


__all__ = ["rnn_weight_shapes", "check_rnn_module", "check_rnn_tree", "check_lstm_call",
           "guard_lstm_calls", "fxpress_lstm_guard", "LSTM_OPS"]
