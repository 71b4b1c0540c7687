"""How a compressed layer computes at run time: its decode strategy.

A low-bit, codebook or binarized layer stores its weight compressed. At run time it can:

* ``"per_call"``: decode the weight on every call. Holds nothing beyond the stored tensors;
  each call pays for unpacking the whole weight (an embedding unpacks only the rows it
  looks up).
* ``"float"``: decode once and keep a float32 copy (4 bytes per weight held).
* ``"int8"``: decode once, re-quantize the weight to int8 per output channel (symmetric,
  absmax) and run the dynamic int8 path of :mod:`fxpress.passes.int8` (the input is
  quantized per token at run time). Holds the int8 codes and the kernel's prepacked copy
  (about 2 bytes per weight, one more per kernel used). Linear layers only. It is a
  re-quantization of the decoded weight: :meth:`DecodeStrategy.decode_info` reports its
  error (``int8_error``, relative L2 against the decoded weight).
* ``"auto"`` (the default): ``"int8"`` for linear layers at least
  :data:`AUTO_INT8_MIN_WIDTH` wide both ways whose re-quantization error is at most
  :data:`AUTO_INT8_MAX_ERROR`; ``"float"`` for other linear layers and for convs;
  ``"per_call"`` for embeddings of more than :data:`AUTO_EMBEDDING_FLOAT_MAX` weights that
  unpack only the rows they look up (else ``"float"``). A layer storing int8 codes runs a
  call in float from a copy decoded once when the call is small
  (:data:`AUTO_INT8_MIN_WORK`).
  Per batch size, the int8 path then picks its kernel by the rows of each call
  (:data:`~fxpress.passes.int8.ONEDNN_MIN_ROWS`).

Every copy is a run-time cache (never in ``state_dict``), so the artifact stays the
compressed size; the strategy is part of the module's ``config()``, so a loaded artifact
takes the same path. While a layer is fine-tuned it always decodes (gradients reach what
is trained). Choose for a whole model with :func:`set_decode`; :func:`decode_plan` lists
each layer's path and the memory every strategy would hold.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterable, Iterator

import torch

from fxpress.graph.memory import caches_enabled
from fxpress.graph.weights import CONV, EMBEDDING, LINEAR

#: The strategies a compressed layer takes (``"once"`` is accepted as ``"float"``).
DECODE_CHOICES = ("auto", "int8", "float", "per_call")
#: ``auto`` runs a linear layer in int8 only when its input and output widths are both at
#: least this: narrower layers (a digits MLP's) ran 0.2-1.1x fp32 through the int8 path,
#: the per-call quantization of the input costing more than the smaller matmul saves.
AUTO_INT8_MIN_WIDTH = 256
#: ``auto`` keeps a layer in float when re-quantizing its decoded weight to int8 (per
#: output channel) changes it by more than this relative L2 error (one outlier weight in
#: a row coarsens that row's step). 4-bit and codebook weights of MiniLM re-quantize with
#: an error of 0.007 (most layers) to 0.02 (384x1536 layers of 4-bit groups).
AUTO_INT8_MAX_ERROR = 0.03
#: ``auto`` runs a call of a layer that stores int8 codes (``quantize{bits=8}``) in float,
#: from a copy decoded once, when the call's work ``max(rows, 4) x in x out`` is below this:
#: there the dynamic int8 path's fixed cost per call (quantizing the input, the kernel's
#: dispatch) outweighs what the integer product saves. Measured at 1 thread, int8 over
#: fp32 ``F.linear`` (``bench/case_quantize.py``'s small-call table): 64x64 0.39x at 1 row,
#: 1.04x at 512 rows; 128x128 0.67x at 16 rows, 1.15x at 64; 256x256 0.59x at 1 row,
#: 1.44x at 16; 384x384 0.99x at 1 row, 2.34x at 16; 384x1536 2.29x at 1 row.
AUTO_INT8_MIN_WORK = 600_000
#: ``auto`` keeps a float copy of an embedding table of at most this many weights (256 KB)
#: instead of unpacking the looked-up rows on every call: a 50x16 int8 table's lookup of
#: 3 rows took 31 us per call that way against 5 us for torch's own embedding. Larger
#: tables (a vocabulary's) unpack their rows per call and hold nothing.
AUTO_EMBEDDING_FLOAT_MAX = 65_536
#: How the int8 path of a decoded layer quantizes its input: one scale per row needs no
#: calibration (an outlier token does not flatten the others).
DECODED_ACT_SCALE = "token"


_KERNELS_ONLY = threading.local()


@contextlib.contextmanager
def int8_kernels_only() -> Iterator[None]:
    """While the block runs (in this thread), every call of a layer storing int8 codes takes
    the int8 kernels, as ``decode="int8"`` would, small calls too (see
    :data:`AUTO_INT8_MIN_WORK`): what an ONNX export reproduces, and what the pipeline's
    verifier measures (it runs with run-time caches off, so without the float copy)."""
    _KERNELS_ONLY.depth = getattr(_KERNELS_ONLY, "depth", 0) + 1
    try:
        yield
    finally:
        _KERNELS_ONLY.depth -= 1


def small_calls_in_float() -> bool:
    """False inside :func:`int8_kernels_only`."""
    return not getattr(_KERNELS_ONLY, "depth", 0)


def normalize_decode(strategy: str) -> str:
    """``strategy`` checked against :data:`DECODE_CHOICES` (``"once"`` means ``"float"``)."""
    if strategy == "once":
        return "float"
    if strategy not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {DECODE_CHOICES}, got {strategy!r}")
    return strategy


def int8_twin(w2: torch.Tensor, bias: torch.Tensor | None):
    """A :class:`~fxpress.passes.quantize_modules.QuantizedLinear` running ``F.linear(x,
    w2, bias)`` through the dynamic int8 path: ``w2`` re-quantized to int8 per output
    channel (symmetric, absmax), input quantized per token."""
    from fxpress.passes.quantize_grid import quantize_stored
    from fxpress.passes.quantize_modules import QuantizedLinear

    codes, scale, _ = quantize_stored(w2.detach().float(), 8, "symmetric", "channel")
    return QuantizedLinear(tuple(w2.shape), codes, scale, None,
                           None if bias is None else bias.detach().float(), 8, "symmetric",
                           "channel", 0, activations="dynamic", act_scale=DECODED_ACT_SCALE,
                           stored=True)


def requantize_error(w2: torch.Tensor, twin) -> float:
    """Relative L2 error of the int8 twin's weight against ``w2``."""
    decoded = twin.qweight.float() * twin.scale.reshape(-1, 1)
    num = torch.linalg.vector_norm(decoded - w2.float())
    return float(num / torch.linalg.vector_norm(w2.float()).clamp_min(1e-30))


class DecodeStrategy:
    """Mixin for :class:`~fxpress.graph.runtime.CompressedModule` subclasses: the decode
    strategy (see the module docstring). Subclasses say whether an embedding lookup
    decodes only its rows (:meth:`gathers_rows`) and call :meth:`decode_path` in forward.
    """

    #: "auto", "int8", "float" or "per_call"; part of config(), so artifacts keep it
    decode = "auto"

    # -- choosing -------------------------------------------------------------------------
    def set_decode(self, strategy: str) -> None:
        """Use ``strategy`` from now on (drops any decoded copy)."""
        self.decode = normalize_decode(strategy)
        self.cache_weight = False  # the strategy says it now (cache_weight: the older switch)
        self.drop_cache()

    def gathers_rows(self) -> bool:
        """True when a ``per_call`` embedding lookup unpacks only the rows it reads."""
        return False

    def _fine_tuning(self) -> bool:
        return any(p is not None and p.requires_grad for n, p in self._parameters.items()
                   if n != "bias")

    def _requested(self) -> str:
        strategy = normalize_decode(getattr(self, "decode", "auto"))
        if strategy == "auto" and self.cache_weight:  # artifacts before the strategies
            return "float"
        return strategy

    def _int8_capable(self) -> bool:
        return self.kind == LINEAR and len(self.shape) == 2

    def decode_path(self) -> str:
        """What forward does now: ``"int8"``, ``"float"`` or ``"per_call"`` (fine-tuning:
        always ``"per_call"``). ``auto``'s choice is remembered until :meth:`drop_cache`."""
        if self._fine_tuning():
            return "per_call"
        if torch.compiler.is_compiling():
            # fxpress.compile decodes in the graph (a constant once frozen); stored int8
            # codes take int8_forward's traceable form
            return "int8" if self.native_int8() else "per_call"
        path = self.__dict__.get("_decode_path")
        if path is None:
            path = self._choose_path()
            self.__dict__["_decode_path"] = path
        return path

    def native_int8(self) -> bool:
        """True when the stored weight already runs the int8 path (no twin needed)."""
        return False

    def _choose_path(self) -> str:
        strategy = self._requested()
        if self.native_int8():
            return "int8" if strategy in ("auto", "int8") else strategy
        if strategy == "int8" and self._int8_capable():
            return "int8"
        if strategy in ("float", "per_call"):
            return strategy
        # auto, or int8 where the op has no int8 path
        if self.kind == EMBEDDING:
            small = math.prod(self.shape) <= AUTO_EMBEDDING_FLOAT_MAX
            return "per_call" if self.gathers_rows() and not small else "float"
        if self.kind == CONV or not self._int8_capable():
            return "float"
        if strategy == "auto" and min(self.shape) < AUTO_INT8_MIN_WIDTH:
            return "float"
        twin = self._twin()
        return "int8" if self.__dict__["_int8_error"] <= AUTO_INT8_MAX_ERROR else "float"

    def _twin(self):
        """The int8 twin of this layer (cached while runtime caches are on)."""
        twin = self.__dict__.get("_int8_twin")
        if twin is None:
            with torch.no_grad():
                w2 = self.weight_float().reshape(self.shape[0], -1)
                twin = int8_twin(w2, getattr(self, "bias", None))
                self.__dict__["_int8_error"] = requantize_error(w2, twin)
            del w2
            if caches_enabled():
                self.__dict__["_int8_twin"] = twin
        return twin

    def config(self) -> dict:
        # the default is left out: files keep their size, and older ones load as "auto"
        extra = {} if self.decode == DecodeStrategy.decode else {"decode": self.decode}
        return {**super().config(), **extra}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], parameters=()):
        if "decode" in config:
            normalize_decode(config["decode"])  # a bad value is refused before any tensor is used
        return super().from_state(config, tensors, parameters)

    def keeps_decoded(self) -> bool:
        return self.decode_path() == "float"

    def drop_cache(self) -> None:
        super().drop_cache()
        for key in ("_int8_twin", "_int8_error", "_decode_path"):
            self.__dict__.pop(key, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == LINEAR and not x.requires_grad and self.decode_path() == "int8":
            return self._twin().int8_forward(x)
        return super().forward(x)

    # -- reporting ------------------------------------------------------------------------
    def held_bytes(self) -> dict[str, int]:
        """Bytes each strategy holds at run time beyond the stored tensors: ``per_call``
        none (a call needs the float weight while it runs), ``float`` 4 per weight, ``int8``
        (linear layers) the twin's codes and row scales plus one prepacked copy per int8
        kernel used (at least one; a layer with stored int8 codes needs no twin)."""
        n = math.prod(self.shape)
        rows = int(self.shape[0])
        held = {"per_call": 0, "float": 4 * n}
        if self._int8_capable():
            native = self.native_int8()
            runner = self if native else self.__dict__.get("_int8_twin")
            kernels = max(1, len(_packed_backends(runner))) if runner is not None else 1
            held["int8"] = (0 if native else n + 4 * rows) + kernels * (n + 4 * rows)
            if "small_call_weight" in self.__dict__:  # auto's float copy for small calls
                held["int8"] += 4 * n
        return held

    def decode_info(self) -> dict[str, Any]:
        """The layer's strategy, the path it takes, the int8 re-quantization error (when
        measured) and the bytes each strategy holds at run time beyond the stored tensors
        (``held_bytes``; ``per_call`` also needs the float weight for the length of a call)."""
        path = self.decode_path()
        held = self.held_bytes()
        error = self.__dict__.get("_int8_error")
        if error is None and path == "int8" and not self.native_int8():
            self._twin()
            error = self.__dict__.get("_int8_error")
        return {"decode": self._requested(), "path": path,
                "int8_error": None if error is None else round(error, 6),
                "stored_bytes": sum(t.numel() * t.element_size() for t in self.state_dict().values()),
                "held_bytes": held, "held_now": held.get(path, 0)}


def _packed_backends(twin) -> list[str]:
    from fxpress.passes.int8 import prepacked_backends

    return prepacked_backends(twin)


def _decode_modules(model: torch.nn.Module, layers: Iterable[str] | None = None):
    import fnmatch

    pats = None if layers is None else list(layers)
    for name, m in model.named_modules():
        if isinstance(m, DecodeStrategy) and (
                pats is None or any(fnmatch.fnmatchcase(name, p) for p in pats)):
            yield name, m


def set_decode(model: torch.nn.Module, strategy: str = "auto",
               layers: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Set how the compressed layers of ``model`` (a rewritten or loaded graph) compute at
    run time: ``"auto"``, ``"int8"``, ``"float"`` or ``"per_call"`` (see
    :mod:`fxpress.passes.decode`). ``layers``: glob patterns on layer names (default all).
    Decoded copies are dropped and rebuilt on the next call. Returns :func:`decode_plan`.

    >>> fxpress.set_decode(res.module, "int8")         # doctest: +SKIP
    [{'layer': 'bert.encoder.layer.0.attention.self.query', 'path': 'int8', ...}, ...]
    """
    from fxpress.errors import InputError

    try:
        strategy = normalize_decode(strategy)
    except ValueError as e:
        raise InputError(f"set_decode: {e}") from None
    found = list(_decode_modules(model, layers))
    if layers is not None and not found:
        raise InputError(f"set_decode: no compressed layer matches {list(layers)}; "
                         f"layers are {[n for n, _ in _decode_modules(model)]}")
    for _, m in found:
        m.set_decode(strategy)
    return decode_plan(model)


def decode_plan(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per compressed layer: its name, kind and shape, the strategy asked for, the path
    it takes, the int8 re-quantization error, its stored bytes and the bytes each strategy
    holds at run time (``held_bytes``; ``held_now`` for its path). Choosing an ``auto``
    layer's path re-quantizes it once (kept as a runtime cache)."""
    rows = []
    for name, m in _decode_modules(model):
        rows.append({"layer": name, "kind": m.kind, "shape": list(m.shape), **m.decode_info()})
    return rows


def format_decode_plan(rows: list[dict[str, Any]]) -> str:
    """:func:`decode_plan` as a text table (what ``fxpress inspect --decode`` prints)."""
    from fxpress.graph.inspect import human_bytes

    head = ("layer", "kind", "shape", "decode", "path", "int8 err", "stored", "held (path)",
            "float", "int8")
    out = [head]
    for r in rows:
        h = r["held_bytes"]
        out.append((r["layer"], r["kind"], "x".join(map(str, r["shape"])), r["decode"], r["path"],
                    "-" if r["int8_error"] is None else f"{r['int8_error']:.4f}",
                    human_bytes(r["stored_bytes"]), human_bytes(r["held_now"]),
                    human_bytes(h["float"]), human_bytes(h["int8"]) if "int8" in h else "-"))
    total = sum(r["held_now"] for r in rows)
    widths = [max(len(str(row[i])) for row in out) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in out]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"held at run time beyond the stored tensors: {human_bytes(total)}")
    return "\n".join(lines)


__all__ = ["DECODE_CHOICES", "AUTO_INT8_MIN_WIDTH", "AUTO_INT8_MAX_ERROR", "AUTO_INT8_MIN_WORK",
           "AUTO_EMBEDDING_FLOAT_MAX", "int8_kernels_only",
           "small_calls_in_float", "DecodeStrategy",
           "set_decode", "decode_plan", "format_decode_plan", "int8_twin", "normalize_decode"]
