"""quantize: store weights as packed integers with a scale per channel, tensor or group.

``quantize{bits=8}`` rewrites every linear, conv and embedding into a runtime module that
stores ``q = clamp(round(w / s))`` (symmetric) or ``q = clamp(round(w / s) + z)`` (affine,
with an integer zero point ``z``), packed at its real width (int8 as int8, 4-bit two per
byte, 3/5/6/7-bit through :func:`~fxpress.graph.packing.pack_bits`), plus the scales
and the bias. Decoding is ``w ≈ s · (q - z)``; ``scale="unit"`` is the seed article's
``round(w)`` (s = 1). Zeros stay exactly zero in both schemes (``z`` is an integer).

Linear layers with ``activations="dynamic"`` run as an integer matmul with the input
quantised to 8 bits at run time, in one of two ways chosen per layer (``act_scale``):
``"tensor"``, one affine scale for the whole input (three elementwise passes; layers that
read one input, such as q, k and v, share one quantisation of it), or ``"token"``, one
scale per row, so an outlier in one token does not flatten the others (two more passes
over the input and one over the output). Where a few input *channels* carry outliers
(after LayerNorm in BERT), SmoothQuant-style migration (``smooth``) divides them out of
the input and into the weight (one more pass). ``act_scale="auto"`` (the default)
measures, per layer on the calibration inputs, the output error of per-tensor, smoothed
per-tensor and per-token activations, and keeps the cheapest whose error is at most
``act_error`` (or within :data:`AUTO_SLACK` of the best); the stats show every
candidate's error. The integer product runs in oneDNN's int8 linear (AMX/VNNI), else
fbgemm's, else ``torch._int_mm``, else a float64 reference.

Weight-only layers (``activations="none"``, convs, embeddings) decode their weight on
the fly (embeddings decode only the rows they look up). Weight-only linear layers also
try activation-aware scaling (AWQ-style: input columns that carry large activations get
finer steps, folded back when the weight is decoded) and keep the most faithful.

>>> res = fxpress.compress(model, "quantize{bits=8}", calibration=batches)     # doctest: +SKIP
>>> res.records[0].stats["layers"]["fc1.weight"]                               # doctest: +SKIP
{'kind': 'linear', 'bits': 8, 'kernel': 'onednn', 'act_scale': 'tensor', 'rel_error': 0.0042,
 'act_errors': {'tensor': 0.0042, 'tensor+smooth0.5': 0.0051, ...}, 'bytes_after': 19400, ...}

Fine-tuning (the distill pass's recovery step): :meth:`QuantizedWeight.begin_training`
adds a float latent weight used through a straight-through estimator, so every forward
in training stays on the quantisation grid; :meth:`QuantizedWeight.end_training`
re-quantises it into the packed storage with the same scales and drops it.
"""
from __future__ import annotations

import math
import operator
import types
from collections import Counter

import torch
import torch.fx

from fxpress.errors import OptionError
from fxpress.graph.memory import stored_bytes, trim_heap
from fxpress.graph.runtime import CompressedModule, op_forward
from fxpress.graph.weights import CONV, EMBEDDING, LINEAR, select
from fxpress.graph.weights import weighted_ops as _weighted_ops
from fxpress.passes.base import (Pass, PassContext, PassResult, PassTraits, Tolerance,
                                 check_glob_matches, option)
from fxpress.passes.int8 import (INT8_BACKENDS, Int8Kernels, int8_backend, per_token_absmax,
                                 quantize_per_tensor, quantize_per_token)
from fxpress.passes.quantize_grid import (GRANULARITIES, SCHEMES, _quantize,
                                          code_range, dequantize_weight, load_codes,
                                          quantize_stored, quantize_weight, store_codes)
from fxpress.passes.decode import AUTO_INT8_MIN_WORK, normalize_decode
from fxpress.passes.watch import WatchInterpreter
from fxpress.passes.quantize_modules import (RUNTIME_MODULES, SMOOTH_MIN, QuantizedConv,
                                             QuantizedEmbedding, QuantizedLinear, QuantizedWeight)

_NONE = type(None)

# -- calibration: what each op sees --------------------------------------------------------

class _InputRecorder(WatchInterpreter):
    """Runs a graph and keeps, for chosen nodes, the per-column absmax over every batch
    and a sample of rows from the first batch (to measure each layer's output error);
    for the linear layers of ``outputs`` (op node -> op), also the layer's own output on
    those rows (:meth:`reference`), which the calibration forward computes anyway."""

    def __init__(self, gm, nodes: dict[torch.fx.Node, str], sample_rows: int,
                 outputs: dict | None = None):
        outputs = outputs or {}
        super().__init__(gm, {**dict.fromkeys(outputs, None), **nodes})
        self.sample_rows = sample_rows
        self.absmax: dict[torch.fx.Node, torch.Tensor] = {}
        self.sample: dict[torch.fx.Node, torch.Tensor] = {}
        #: per weight (op.key) being quantised: max |w| of each input column
        #: (:meth:`Quantize._wmax`), dropped once its layer is replaced
        self.wmax: dict = {}
        self._outputs = outputs
        #: op node -> the layer's output on its input's sample rows (float32 layers only)
        self.outputs: dict[torch.fx.Node, torch.Tensor] = {}
        self._steps: dict[torch.fx.Node, int] = {}  # input node -> its sample's row step
        self._budget = OUTPUT_SAMPLES
        self._first = True

    def record(self, batches, names=None):
        # the references are the first batch's, like the samples
        for i, b in enumerate(batches):
            self._first = i == 0
            super().record([b], [names[i] if names is not None else f"calibration batch {i}"])
        return self

    def watched(self, n, out):
        if n in self._outputs:
            self._watched_output(n, out)
        kind = self.watch[n]
        if kind is None:  # an output only
            return
        if isinstance(out, torch.Tensor):
            if kind == LINEAR:
                x2 = out.detach().reshape(-1, out.shape[-1]).float()
                a = x2.abs().amax(0)
                self.absmax[n] = a if n not in self.absmax else torch.maximum(self.absmax[n], a)
                if n not in self.sample:
                    step = max(1, x2.shape[0] // self.sample_rows)
                    self.sample[n] = x2[::step][: self.sample_rows].clone()
                    if out.dtype == torch.float32:
                        self._steps[n] = (step, x2.shape[0])
            elif n not in self.sample:
                self.sample[n] = out.detach()[: max(1, min(len(out), 64))].clone()

    def _watched_output(self, n, out) -> None:
        """Keep a float32 linear layer's output on its input's sample rows (the first
        batch's), while :data:`OUTPUT_SAMPLES` bytes allow."""
        op = self._outputs[n]
        seen = self._steps.get(op._input) if self._first else None
        if seen is None or n in self.outputs or not isinstance(out, torch.Tensor) \
                or out.dtype != torch.float32 or out.dim() < 1:
            return
        step, in_rows = seen
        w, b = op.weight(), op.bias()
        if w.dtype != torch.float32 or (b is not None and b.dtype != torch.float32) \
                or out.shape[-1] != w.shape[0]:
            return
        y2 = out.detach().reshape(-1, out.shape[-1])
        rows = y2[::step][: self.sample_rows]
        if y2.shape[0] != in_rows or rows.numel() * 4 > self._budget:
            return
        self._budget -= rows.numel() * 4
        self.outputs[n] = rows.clone()

    def reference(self, op, rows: int) -> torch.Tensor | None:
        """The layer's float output on the first ``rows`` rows of its input's sample, as
        the calibration forward computed it, or None (not recorded: compute it)."""
        y = self.outputs.get(op.node)
        return None if y is None else y[:rows]


#: Bytes of layer outputs :class:`_InputRecorder` keeps as the reference outputs of the
#: layers' candidates at most (GPT-2 124M's on 64 tokens: 21 MB; MiniLM's on 512 rows:
#: 40 MB); the layers past it compute theirs again, as the layers whose outputs come
#: after the last recorded input do (a language model's head: recording it would run it).
OUTPUT_SAMPLES = 64 << 20


def _record_inputs(gm, ops, batches, sample_rows=512, names=None):
    nodes = {}
    for op in ops:
        if isinstance(op._input, torch.fx.Node):
            nodes.setdefault(op._input, op.kind)
    # the outputs of linear layers that the recording runs anyway (before its last input)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max((order[n] for n in nodes if n in order), default=-1)
    # (an input written in place before its layer reads it would not be the sample's; a
    # weight several nodes read, an exported layer called twice as ALBERT's shared layers
    # are, is measured once on one node's sample: its reference is computed from that
    # sample, as the other call's output was 0.93 off it)
    reads = Counter(op.key for op in ops)
    outputs = {op.node: op for op in ops
               if op.kind == LINEAR and op.form != "fused" and op._input in nodes
               and reads[op.key] == 1
               and order.get(op.node, last) < last and _never_written(gm, op._input)}
    return _InputRecorder(gm, nodes, sample_rows, outputs).record(batches, names)


# -- the pass ------------------------------------------------------------------------------

class Quantize(Pass):
    """Integer weights with scales per channel/tensor/group; int8 dynamic activations."""

    name = "quantize"
    summary = ("Store weights as packed integers (2-8 bits) with per-channel/tensor/group scales; "
               "linear layers run int8 x int8 with per-token activation scales.")
    # int8 keeps sentence-embedding cosine >= 0.99 and 4-bit groups >= 0.97 on MiniLM;
    # narrower widths lose more and must say so with tol.* overrides
    traits = PassTraits(tolerance=Tolerance(min_cosine=0.97, min_top1=0.95), replaces_tensors=True,
                        runtime_modules=RUNTIME_MODULES)

    bits = option(8, "bits per weight code (2-8)", type=int, low=2, high=8)
    granularity = option("channel", "one scale per output 'channel', per 'tensor', or per "
                         "'group' of group_size input columns", choices=GRANULARITIES)
    group_size = option(None, "input columns per scale with granularity=group (a layer whose "
                        "input width it does not divide gets a shorter last group)",
                        type=(int, _NONE), low=1)
    scheme = option("symmetric", "'symmetric' (q in ±(2^(b-1)-1), zero point 0) or 'affine' "
                    "(q in 0..2^b-1 with an integer zero point)", choices=SCHEMES)
    activations = option("auto", "'dynamic': linear layers quantise their input to 8 bits at "
                         "run time and multiply in integers; 'none': weight-only (decode, float "
                         "matmul); 'auto': dynamic, or none with granularity=group",
                         choices=("auto", "dynamic", "none"))
    scale = option(None, "'absmax': scale from each channel/group's full range; 'mse': the "
                   "clipped range with the least squared error; 'unit': s = 1, the seed article's "
                   "round(w). Default: absmax at 8 bits, mse below", type=(str, _NONE),
                   choices=("absmax", "mse", "unit", None))
    smooth = option(None, "SmoothQuant migration strength alpha in [0, 1] for dynamic linear "
                    "layers: divides input columns by absmax(x)^a / absmax(w)^(1-a) measured on "
                    "the calibration batches, and multiplies the weight by it", type=(float, _NONE),
                    low=0.0, high=1.0)
    act_scale = option("auto", "how dynamic linear layers quantise their input at run time: "
                       "'tensor' (one affine scale: the fastest), 'token' (a scale per row), or "
                       "'auto': per layer, the cheapest of per-tensor, smoothed per-tensor and "
                       "per-token whose output error on the calibration inputs is at most "
                       "act_error (else within AUTO_SLACK of the best); "
                       "stats['layers'][...]['act_errors'] lists every candidate's error",
                       choices=("auto", "tensor", "token"))
    act_error = option(0.03, "with act_scale=auto: the layer output error (relative L2) up to "
                       "which the cheapest activation scaling is good enough; lower it for "
                       "fidelity, raise it for speed", type=float, low=0.0)
    max_layer_error = option(None, "re-quantize at 8 bits every layer whose own output error "
                             "(relative L2 on the calibration inputs) exceeds this; the "
                             "layers kept at 8 bits are listed in stats['promoted']; unset: "
                             "only layers of at most 4096 weights, above 0.25 and over twice "
                             "their weight error",
                             type=(float, _NONE), low=0.0, low_open=True)
    decode = option("auto", "how weight-only layers compute at run time: 'per_call' decodes "
                    "the weight on every forward (memory); 'float' keeps the decoded weight; "
                    "'int8' re-quantizes it once to int8 per channel and runs the int8 path "
                    "(linear layers); 'auto': int8 for wide linear layers, float for the rest, "
                    "embeddings look up their rows (none of it stored; fxpress.set_decode "
                    "changes it later)", choices=("auto", "int8", "float", "per_call"))
    embeddings = option(True, "quantize embedding tables too")
    include = option(["*"], "glob patterns on weight or layer names to quantize")
    exclude = option([], "glob patterns to leave in float")

    def check_options(self) -> None:
        if self.granularity == "group" and self.group_size is None:
            raise OptionError(self.name, "group_size", "granularity=group needs group_size=N "
                              "(e.g. 64 or 128)")
        if self.group_size is not None and self.granularity != "group":
            raise OptionError(self.name, "group_size", "only applies with granularity=group")
        if self.scale is None:
            self.scale = "absmax" if self.bits == 8 else "mse"
            self.options["scale"] = self.scale
        if self.activations == "auto":
            self.activations = "none" if self.granularity == "group" else "dynamic"
            self.options["activations"] = self.activations
        if self.activations == "dynamic" and self.granularity == "group":
            raise OptionError(self.name, "activations", "dynamic int8 activations need one "
                              "weight scale per output channel (an integer matmul cannot apply "
                              "per-group scales); use activations=none with granularity=group")
        if self.scale == "unit" and (self.scheme != "symmetric" or self.granularity == "group"):
            raise OptionError(self.name, "scale", "scale=unit is round(w) with s = 1: use it "
                              "with scheme=symmetric and granularity channel or tensor")
        if self.smooth is not None and self.activations != "dynamic":
            raise OptionError(self.name, "smooth", "smoothing moves activation outliers into "
                              "the weights for int8 activations; it needs activations=dynamic")
        if self.act_scale != "auto" and self.activations != "dynamic":
            raise OptionError(self.name, "act_scale", "chooses how int8 activations are "
                              "scaled; it needs activations=dynamic")
        if self.smooth is not None and self.scale == "unit":
            raise OptionError(self.name, "smooth", "a smoothed weight needs a real scale, not scale=unit")

    def run(self, gm, ctx: PassContext) -> PassResult:
        kinds = [LINEAR, CONV] + ([EMBEDDING] if self.embeddings else [])
        all_ops = _weighted_ops(gm, kinds, fused=True)
        chosen, unmatched = select(all_ops, self.include, self.exclude)
        check_glob_matches(self.name, unmatched, [op.name for op in all_ops])
        batches = ctx.calibration or [ctx.example_inputs]
        rec = _record_inputs(gm, chosen, batches,
                             names=None if ctx.calibration else ["example_inputs"])

        # one module per distinct weight and kind; ops of one kind that share a weight
        # share its module's buffers, and a weight tied between an embedding and a linear
        # (GPT-2's) gets one module of each kind over the same codes and scales
        built: dict[tuple[str, str], QuantizedWeight] = {}
        codes: dict[tuple, tuple] = {}
        layers: dict[str, dict] = {}
        promoted: list[str] = []
        readers = Counter(op._input for op in chosen if isinstance(op._input, torch.fx.Node))
        # the ops of one weight one after another: a weight tied between two ops (GPT-2's
        # token embedding and head) is freed once both are replaced, not at the pass's
        # end; tied weights last, when the weights replaced before have made room for
        # their codes (the pipeline's peak memory)
        by_weight: dict = {}
        for op in chosen:
            by_weight.setdefault(op.key, []).append(op)
        groups = sorted(by_weight.values(), key=lambda ops: len(ops) > 1)  # stable
        # dynamic linear layers reading one input (q, k, v) get one smoothing factor and,
        # where every one of them accepts it, one scaling: one division and one
        # quantisation of their input, at run time and in an exported graph (weight-only
        # layers keep their own: their scaling is free in fxpress, and sharing it cost
        # MiniLM's 4-bit 0.0026 of cosine for no measurable speed in ONNX Runtime)
        self._group_of = _input_groups([op for op in chosen if self._dynamic(op, self.bits)])
        self._group_wmax = {}
        decided: dict = {}
        trim_heap()  # what recording the calibration inputs freed
        for op in [op for ops in groups for op in ops]:
            x = rec.sample.get(op._input) if isinstance(op._input, torch.fx.Node) else None
            module = built.get((op.name, op.kind))
            if module is not None:
                module = _share(module)
            else:
                group = self._group_of.get(op.name)
                if group is not None and op.name not in decided:
                    decided.update(self._choose_group(group, rec, x, self.bits, codes))
                module, stats = decided.pop(op.name, None) or self._choose(op, rec, x, self.bits, codes)
                if self.bits < 8 and (stats["rel_error"] > self.max_layer_error
                                      if self.max_layer_error is not None else
                                      op.numel <= TINY_LAYER_WEIGHTS
                                      and stats["rel_error"] > TINY_LAYER_ERROR
                                      and stats["rel_error"] > TINY_LAYER_RATIO
                                      * stats.get("weight_error", 0.0)):
                    # the most sensitive layers keep 8 bits (per channel: the integer
                    # kernel can still run them)
                    low = stats["rel_error"]
                    module, stats = self._choose(op, rec, x, 8, codes)
                    stats["error_at_low_bits"] = low
                    promoted.append(op.name)
                built[(op.name, op.kind)] = module
                layers[op.name] = stats
                if len(op.tied) == 1:  # only a tied weight's other ops can reuse its codes
                    for key in [k for k in codes if k[0] == op.name]:
                        del codes[key]
            del x
            if isinstance(op._input, torch.fx.Node) and op._input in readers:
                readers[op._input] -= 1
                if not readers[op._input]:  # its last reader is built: drop the recorded input
                    rec.sample.pop(op._input, None)
                    rec.absmax.pop(op._input, None)
            rec.wmax.pop(op.key, None)
            rec.outputs.pop(op.node, None)
            op.replace_with(module)
        before = sum(v["bytes_before"] for v in layers.values())
        after = sum(v["bytes_after"] for v in layers.values())
        worst = max(layers, key=lambda k: layers[k]["rel_error"], default=None)
        return PassResult(gm, changed=bool(chosen), stats={
            "layers": layers, "quantized_layers": len(layers), "bits": self.bits,
            "bytes_before": before, "bytes_after": after,
            "worst_layer": worst, "promoted": promoted, "kernels": sorted({v["kernel"] for v in layers.values()})})

    def _dynamic(self, op, bits: int) -> bool:
        # a promoted layer (bits != self.bits) gets 8-bit channel scales and the integer kernel
        # a fused call's matrix (an LSTM gate) is decoded for the fused kernel: weight-only
        return op.kind == LINEAR and op.form != "fused" and (
            self.activations == "dynamic" or bits != self.bits)

    def _candidates(self, op, bits: int) -> list[tuple[str, float | None]]:
        """(act_scale, smoothing alpha) variants for one layer, cheapest first. A weight
        tied to another op (GPT-2's head and token embedding) is never smoothed: its
        codes are shared, and a smoothed copy would be stored beside them."""
        cands = self._all_candidates(op, bits)
        if len(op.tied) > 1:
            cands = [c for c in cands if c[1] is None] or cands
        return cands

    def _all_candidates(self, op, bits: int) -> list[tuple[str, float | None]]:
        if not self._dynamic(op, bits):
            # weight-only: activation-aware scaling (AWQ-style) costs nothing at run time,
            # since the weight is decoded anyway: try it on linear layers
            if op.kind == LINEAR and self.act_scale == "auto" and self.smooth is None:
                return [("token", None)] + [("token", a) for a in WEIGHT_ONLY_ALPHAS]
            return [("token", None)]
        alphas = [self.smooth] if self.smooth is not None else [None]
        if self.act_scale != "auto":
            return [(self.act_scale, alphas[0])]
        if self.smooth is None:
            return [("tensor", None)] + [("tensor", a) for a in AUTO_ALPHAS] + [("token", None)]
        return [("tensor", self.smooth), ("token", self.smooth)]

    def _choose(self, op, rec: _InputRecorder, x: torch.Tensor | None, bits: int,
                codes: dict[tuple, tuple]) -> tuple[QuantizedWeight, dict]:
        """The layer's runtime module and its stats: with several candidates, the cheapest
        whose output error on the calibration sample ``x`` is at most ``act_error`` or
        within :data:`AUTO_SLACK` of the best (per-token, the safest, when there is no
        sample)."""
        w, b = op.weight().detach(), op.bias()
        cands = self._candidates(op, bits)
        if x is not None and op.kind != EMBEDDING and x.shape[0] * w.shape[0] > CANDIDATE_OUTPUTS:
            # a wide layer (a language model's head) is measured on fewer rows, so that the
            # candidates' outputs stay small
            x = x[:max(16, CANDIDATE_OUTPUTS // w.shape[0])]
        if len(cands) > 1 and x is None:
            cands = [c for c in cands if c == ("token", self.smooth)]
        ref = ref_norm = None
        if x is not None:
            with torch.no_grad():
                ref = rec.reference(op, x.shape[0]) if op.kind == LINEAR else None
                if ref is None:
                    ref = op_forward(op.kind, op.spec, x, w, b)
                ref_norm = float(_norm32(ref))
        tried, weight_errors = [], {}
        dynamic = self._dynamic(op, bits)
        w_norm = float(_norm32(w))
        if dynamic and x is not None and (len(cands) > 1 or self._whole_simulated(
                x, bits, cands, w)):
            module, stats = self._choose_simulated(op, rec, x, w, b, bits, cands, codes, ref,
                                                   ref_norm, w_norm)
            if len(cands) == 1:  # nothing to choose: the stats of a fixed scaling, as below
                for key in ("act_errors", "weight_errors", "simulated_errors", "measured",
                            "rejected"):
                    stats.pop(key, None)
            return module, stats
        by_alpha: dict[float | None, float] = {}  # candidates of one smoothing share a weight
        for act, alpha in cands:
            module = self._build(op, rec, bits, act, alpha, codes)
            werr = by_alpha.get(alpha)
            if werr is None:
                werr = by_alpha[alpha] = _weight_error(module, w, w_norm)
            weight_errors[_label(act if dynamic else "weight", alpha)] = werr
            # no input sample (a fused call's matrix): the weight's own relative error
            tried.append((module, werr if x is None else _output_error(module, x, ref, ref_norm),
                          act, alpha, werr))
        # the calibration sample does not show every input: a smoothing that fits it by
        # giving up the weight of columns it leaves (nearly) idle is not kept
        plain = [t[4] for t in tried if t[3] is None]
        limit = max(plain) * SMOOTH_WEIGHT_SLACK if plain else math.inf
        kept = [t for t in tried if t[3] is None or not t[4] > limit]
        best = min(t[1] for t in kept)
        # candidates of a weight-only layer cost the same: keep the best
        good = max(self.act_error, best * (1 + AUTO_SLACK)) if dynamic else best
        module, err, act, alpha, werr = next(t for t in kept if not t[1] > good)
        stats = self._layer_stats(op, module, w, b, err)
        stats["weight_error"] = werr
        if len(cands) > 1:
            stats["act_errors"] = {_label(a if dynamic else "weight", al): e for _, e, a, al, _ in tried}
            stats["weight_errors"] = weight_errors
            stats["rejected"] = [_label(a if dynamic else "weight", al)
                                 for _, _, a, al, we in tried if we > limit]
        if alpha is not None:
            stats["smooth_alpha"] = alpha
        return module, stats

    def _whole_simulated(self, x: torch.Tensor, bits: int, cands: list, w: torch.Tensor
                         ) -> bool:
        """True where a dynamic linear layer's one candidate (``act_scale=tensor`` without
        smoothing: the cheapest candidate of ``auto``) is measured as :meth:`_choose_simulated`
        measures ``auto``'s cheapest: on a sample of at most :data:`WHOLE_SIMULATION_ROWS`
        rows, over the plain 8-bit symmetric per-channel codes, by the float simulation made
        in the pass that makes the codes, instead of building and prepacking a weight for
        the kernel (the same module; its error within float rounding of the kernel's).
        ``act_scale=tensor`` on GPT-2 took 1.4x ``auto``'s time measured through fbgemm.
        Only where the module runs the sample through the int8 kernel: not with
        ``decode=float`` or ``per_call``, nor on a layer whose calls ``auto`` may run in
        float (:meth:`QuantizedLinear.float_call_below`: the simulation quantises the
        input, and its error was up to 2.8x the float call's on a digits MLP)."""
        granularity, _ = self._grid(bits)
        w2 = w.reshape(w.shape[0], -1)
        return (cands == [("tensor", None)] and bits == 8 and granularity == "channel"
                and self.scheme == "symmetric" and x.shape[0] <= WHOLE_SIMULATION_ROWS
                and normalize_decode(self.decode) in ("auto", "int8")
                and 4 * w2.shape[0] * w2.shape[1] >= AUTO_INT8_MIN_WORK)

    def _choose_simulated(self, op, rec, x, w, b, bits, cands, codes, ref, ref_norm, w_norm
                          ) -> tuple[QuantizedWeight, dict]:
        """:meth:`_choose` for a dynamic linear layer with several candidates, ranked by a
        float simulation and confirmed by the real kernel on the finalists only.

        The simulation (:func:`_quantize_measured`) quantises a strided subset of the
        weight's rows (output channels: with per-channel scales each row's codes are its
        own) and multiplies the decoded rows by a subset of the calibration rows quantised
        as the kernel quantises them: the integer product up to float rounding, estimated
        on about :data:`SIMULATED_WEIGHTS` weights and :data:`SIMULATED_ROWS` rows. The
        cheapest candidate is measured first on the whole sample and every output channel,
        and is kept when it is within ``act_error`` (the rule of :meth:`_choose`): where it
        is per-tensor over the plain 8-bit symmetric codes (the default grid), by the same
        simulation over every row and channel, made in the pass that makes the codes (the
        kernel's output up to float rounding, without building and prepacking a weight for
        the kernel); else through the integer kernel. Otherwise
        the candidates over its codes (per-token beside per-tensor: no new weight) run
        through the kernel too, and each other smoothing is built and run unless its
        estimate exceeds :data:`SIMULATION_MARGIN` times the bound the measured ones set
        (the estimates of BERT's FFN layers, whose error sits in a few tokens and
        channels, read up to 1.8x their kernel's error: picked from the estimates,
        MiniLM's int8 lost 0.0007 of sentence-embedding cosine); the rule of
        :meth:`_choose` then picks among the measured candidates, with their weight errors
        measured exactly. ``stats["act_errors"]`` and ``stats["weight_errors"]`` hold the
        measured errors (``stats["measured"]``) and the estimates of the others;
        ``stats["simulated_errors"]`` every candidate's estimate."""
        granularity, scale_mode = self._grid(bits)
        w2 = w.reshape(w.shape[0], -1).float()
        kernel = _kernel_for(w2.shape, self.scheme, x.shape[0])
        keep = getattr(self, "_kernel_measured", None)
        # a float matmul costs more than the int8 kernel: the simulation runs on a strided
        # subset of the sample's rows and, with per-channel scales, of the weight's rows
        # (output channels)
        ch = 1
        if granularity == "channel":
            ch = max(1, w2.shape[0] // max(SIMULATED_WEIGHTS // max(w2.shape[1], 1), 1))
        step = max(1, x.shape[0] // SIMULATED_ROWS)
        # the subset's rows copied together once (about SIMULATED_WEIGHTS weights): from a
        # weight read through a transposed view (GPT-2's Conv1D), each smoothing's dozen
        # elementwise steps gathered them from every cache line of the whole weight again
        # (2x the time on GPT-2's layers)
        w_sub = w2[::ch].contiguous()
        ref_sim = ref[::step, ::ch]
        b_sim = None if b is None else b[::ch]
        # the subset's squared error, scaled to the whole layer, over the whole output's
        # norm (a few output channels, BERT's outlier dimensions, carry most of it)
        sim_norm = ref_norm * math.sqrt(ref_sim.numel() / ref.numel())
        modules: dict[tuple, QuantizedWeight] = {}
        sim: dict[tuple, float] = {}
        est: dict[float | None, float] = {}    # weight errors, estimated on the subset
        exact: dict[float | None, float] = {}  # ... and measured on the whole weight
        # the sample's per-column extremes, which every per-tensor candidate's range
        # comes from (smoothing divides them), taken once
        ranges = (x.amin(0), x.amax(0)) if any(a == "tensor" for a, _ in cands) else None
        measured: dict[tuple, float] = {}
        for alpha in dict.fromkeys(al for _, al in cands):
            acts = [a for a, al in cands if al == alpha]
            smooth = self._smoothing(op, rec, w2, alpha, self._wmax(op, rec, w2, alpha))
            # quantised as a whole (one scale over every row), the subset of rows made
            xs = {a: simulated_input(x, a, smooth, kernel, step, ranges) for a in acts}
            key = (op.key, bits, tuple(w2.shape))  # _build's key of the unsmoothed codes
            plain8 = (alpha is None and granularity == "channel" and bits == 8
                      and self.scheme == "symmetric")
            # the cheapest candidate (per-tensor over the plain 8-bit codes) on the whole
            # sample and every channel, simulated: the kernel's output up to float
            # rounding, measured without building and prepacking a weight for the kernel
            # (on a few rows the float product costs less than fbgemm's prepacking)
            whole = None
            if plain8 and cands[0] == ("tensor", None) and x.shape[0] <= WHOLE_SIMULATION_ROWS:
                whole = xs["tensor"] if step == 1 else simulated_input(
                    x, "tensor", None, kernel, 1, ranges)
            out_whole = None
            if plain8 and key not in codes:
                # the unsmoothed codes every candidate without smoothing is built over,
                # their exact weight error and the subset's simulated outputs (and the
                # whole product) in one pass
                stored, scale, exact[alpha], outs, out_whole = _stored_measured(
                    w2, xs, ch, scale_mode, w_norm, whole)
                codes[key] = (stored, scale, None)
                est[alpha] = exact[alpha]
            elif granularity == "channel":
                est[alpha], outs = _quantize_measured(w_sub, smooth, xs, bits, self.scheme,
                                                      scale_mode)
                if whole is not None:  # codes made already (a tied weight's other op)
                    out_whole, exact[alpha] = _codes_product(*codes[key][:2], whole, w2,
                                                             w_norm)
            else:  # one scale over the whole weight: quantised whole
                module = modules[(acts[0], alpha)] = self._build(op, rec, bits, acts[0], alpha, codes)
                est[alpha], outs = _simulate(module, xs, w2)
                exact[alpha] = est[alpha]
            for a, out in outs.items():
                sim[(a, alpha)] = _rel_error(out, b_sim, ref_sim, sim_norm)
            if out_whole is not None:
                measured[cands[0]] = _rel_error(out_whole, b, ref, ref_norm)
                del out_whole

        def werr(alpha):
            return exact.get(alpha, est[alpha])

        def module_of(c):
            if c not in modules:
                base = next((m for (a, al), m in modules.items() if al == c[1]), None)
                if base is None:
                    modules[c] = self._build(op, rec, bits, c[0], c[1], codes)
                else:  # another scaling over the same codes
                    cfg = dict(base.config(), act_scale=c[0])
                    modules[c] = type(base).from_state(cfg, dict(base.named_buffers()))
                    modules[c].decode = base.decode
            return modules[c]

        def real(c):
            if c not in measured:
                module = module_of(c)
                if c[1] not in exact:
                    exact[c[1]] = _weight_error(module, w, w_norm)
                measured[c] = _output_error(module, x, ref, ref_norm)
                if keep is not None:  # for _choose_group: measured through the kernel
                    keep[(op.name, c)] = (module, measured[c], exact[c[1]])
            return measured[c]

        def kept_by(errs):
            # the calibration sample does not show every input: a smoothing that fits it
            # by giving up the weight of columns it leaves (nearly) idle is not kept
            plain = [errs[al] for _, al in cands if al is None]
            limit = max(plain) * SMOOTH_WEIGHT_SLACK if plain else math.inf
            return [c for c in cands if c[1] is None or not errs[c[1]] > limit], limit

        def kept_measured():
            """The measured candidates the rule keeps, the bound they set, and the limit
            (an unmeasured smoothing counts as rejected)."""
            kept, limit = kept_by(exact | {al: math.inf for al in est if al not in exact})
            done = [c for c in kept if c in measured]
            return done, max(self.act_error, min(measured[c] for c in done) * (1 + AUTO_SLACK)), limit

        chosen = cands[0]
        if real(chosen) > self.act_error:  # the cheapest is not good enough: its other
            # scalings (the same codes), then the smoothings whose estimates may be good
            for c in cands:
                if c[1] == chosen[1]:
                    real(c)
            for c in cands:
                if c not in measured and not sim[c] > SIMULATION_MARGIN * kept_measured()[1]:
                    real(c)
            done, good, _ = kept_measured()
            chosen = next(c for c in done if not measured[c] > good)
        limit = kept_measured()[2]
        module = module_of(chosen)
        stats = self._layer_stats(op, module, w, b, measured[chosen])
        stats["weight_error"] = exact[chosen[1]]
        stats["act_errors"] = {_label(a, al): measured.get((a, al), sim[(a, al)]) for a, al in cands}
        stats["weight_errors"] = {_label(a, al): werr(al) for a, al in cands}
        stats["simulated_errors"] = {_label(a, al): sim[(a, al)] for a, al in cands}
        stats["measured"] = [_label(a, al) for a, al in cands if (a, al) in measured]
        stats["rejected"] = [_label(a, al) for a, al in cands if werr(al) > limit]
        if chosen[1] is not None:
            stats["smooth_alpha"] = chosen[1]
        return module, stats

    def _build(self, op, rec: _InputRecorder, bits: int, act: str = "token",
               alpha: float | None = None, codes: dict[tuple, tuple] | None = None
               ) -> QuantizedWeight:
        """The module for ``op`` with activation scaling ``act`` and smoothing ``alpha``;
        ``codes`` remembers each unsmoothed weight's quantisation by (weight, bits), so
        candidates and modules of different kinds over one weight share it."""
        w = op.weight().detach().float()
        w2 = w.reshape(w.shape[0], -1)
        granularity, scale_mode = self._grid(bits)
        dynamic = self._dynamic(op, bits)
        smooth = self._smoothing(op, rec, w2, alpha, self._wmax(op, rec, w2, alpha))
        if smooth is not None:
            w2 = w2 * smooth
        key = (op.key, bits, tuple(w2.shape))  # the weight, however named
        if smooth is None and codes is not None and key in codes:
            stored, scale, zero = codes[key]
        else:
            stored, scale, zero = quantize_stored(w2, bits, self.scheme, granularity,
                                                  self.group_size or 0, scale=scale_mode)
            if smooth is None and codes is not None:  # a smoothed weight is the op's own
                codes[key] = (stored, scale, zero)
        args = (tuple(w.shape), stored, scale, zero, op.bias(), bits, self.scheme,
                granularity, (self.group_size or 0) if granularity == "group" else 0)
        if op.kind == LINEAR:
            shares = (dynamic and isinstance(op._input, torch.fx.Node)
                      and _never_written(op.node.graph.owning_module, op._input))
            module: QuantizedWeight = QuantizedLinear(
                *args, activations="dynamic" if dynamic else "none", smooth=smooth,
                act_scale=act, shares_input=shares, stored=True)
        elif op.kind == CONV:
            module = QuantizedConv(op.spec, *args, stored=True)
        else:
            module = QuantizedEmbedding(op.spec, *args, stored=True)
        module.decode = normalize_decode(self.decode)  # candidates are measured as they will run
        return module

    def _grid(self, bits: int) -> tuple[str, str]:
        """(granularity, scale mode) at ``bits``: a promoted layer's are per channel, absmax."""
        return ("channel", "absmax") if bits != self.bits else (self.granularity, self.scale)

    @staticmethod
    def _smoothing(op, rec: _InputRecorder, w2: torch.Tensor, alpha: float | None,
                   wmax: torch.Tensor | None = None) -> torch.Tensor | None:
        """The per-input-column factors smoothing ``alpha`` multiplies the weight by (None
        without smoothing or calibration statistics); ``wmax``: the columns' max |w| to
        use (a group's, :meth:`_shared_wmax`), else ``w2``'s own."""
        if op.kind != LINEAR or alpha is None or op._input not in rec.absmax:
            return None
        xmax = rec.absmax[op._input]
        xmax = torch.maximum(xmax, SMOOTH_INPUT_FLOOR * xmax.mean()).clamp(min=1e-5)
        if wmax is None:
            wmax = _column_absmax(w2)
        return (xmax.pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=SMOOTH_MIN)

    def _wmax(self, op, rec: _InputRecorder, w2: torch.Tensor, alpha: float | None
              ) -> torch.Tensor | None:
        """The columns' max |w| smoothing ``alpha`` divides by: the group's
        (:meth:`_shared_wmax`), else the layer's own, taken once per layer (two passes
        over the weight) for all its smoothing strengths and smoothed builds; None
        without smoothing."""
        if alpha is None or op.kind != LINEAR or op._input not in rec.absmax:
            return None
        shared = self._shared_wmax(op)
        if shared is not None:
            return shared
        own = rec.wmax.get(op.key)
        if own is None or own.shape[0] != w2.shape[1]:
            own = rec.wmax[op.key] = _column_absmax(w2)
        return own

    def _shared_wmax(self, op) -> torch.Tensor | None:
        """Max |w| per input column over every layer of ``op``'s input group (SmoothQuant's
        factor for q, k and v over their concatenated weights), or None outside a group."""
        group = getattr(self, "_group_of", {}).get(op.name)
        if group is None:
            return None
        if group[0].name not in self._group_wmax:
            ws = [_column_absmax(g.weight().detach().float().reshape(g.weight().shape[0], -1))
                  for g in group]
            self._group_wmax[group[0].name] = torch.stack(ws).amax(0)
        return self._group_wmax[group[0].name]

    def _choose_group(self, group: tuple, rec: _InputRecorder, x: torch.Tensor | None,
                      bits: int, codes: dict[tuple, tuple]) -> dict[str, tuple]:
        """:meth:`_choose` for dynamic linear layers that read one input (q, k and v),
        with one smoothing factor (:meth:`_shared_wmax`). Each layer first chooses alone;
        when they differ, the cheapest per-tensor candidate (one quantisation of the input
        for all: cheaper than any mix) that every layer accepts by its own rule (error at
        most ``act_error`` or within :data:`AUTO_SLACK` of its best; never a smoothing its
        rule rejected) is taken by all: their input is then divided and quantised once.
        ``{name: (module, stats)}``; each layer's own choice where no candidate suits all."""
        # the candidates each layer's own choice measured through the kernel, with their
        # modules: a shared scaling among them is not built and run again
        self._kernel_measured = {}
        try:
            alone = {op.name: self._choose(op, rec, x, bits, codes) for op in group}
            return self._group_choice(group, rec, x, bits, codes, alone)
        finally:
            self._kernel_measured = None

    def _group_choice(self, group, rec, x, bits, codes, alone) -> dict[str, tuple]:
        """:meth:`_choose_group` once each layer has chosen alone (``alone``)."""

        def picked(stats):
            return (stats["act_scale"], stats.get("smooth_alpha"))

        choices = {name: picked(st) for name, (_m, st) in alone.items()}
        cands = self._candidates(group[0], bits)
        if len(set(choices.values())) == 1 or x is None or any(
                self._candidates(op, bits) != cands or not self._dynamic(op, bits)
                for op in group) or any(c not in cands for c in choices.values()):
            return alone
        # one per-tensor scaling for all is cheaper than any mix (one quantisation of the
        # input instead of two or more); per-token inputs are never shared
        for cand in [c for c in cands if c[0] == "tensor"]:
            label = _label(*cand)
            got = {}
            for op in group:
                module, stats = alone[op.name]
                if choices[op.name] == cand:
                    got[op.name] = (module, stats)
                    continue
                errors = stats.get("act_errors", {})
                if label in stats.get("rejected", ()) or label not in errors:
                    break
                measured = [errors[k] for k in stats.get("measured", errors)
                            if k not in stats.get("rejected", ())]
                best = min(measured) if measured else stats["rel_error"]
                good = max(self.act_error, best * (1 + AUTO_SLACK))
                if label in stats.get("measured", ()) and errors[label] > good:
                    break  # the kernel's error, measured already
                w, b = op.weight().detach(), op.bias()
                hit = self._kernel_measured.get((op.name, cand))
                if hit is not None:  # its module, kernel error and weight error, as below
                    module, err, werr = hit
                else:
                    xo = x if op.kind == EMBEDDING or x.shape[0] * w.shape[0] <= CANDIDATE_OUTPUTS \
                        else x[:max(16, CANDIDATE_OUTPUTS // w.shape[0])]
                    module = self._build(op, rec, bits, cand[0], cand[1], codes)
                    with torch.no_grad():
                        ref = rec.reference(op, xo.shape[0])
                        if ref is None:
                            ref = op_forward(op.kind, op.spec, xo, w, b)
                    err, werr = _output_error(module, xo, ref), None
                if err > good:
                    break
                new = self._layer_stats(op, module, w, b, err)
                for k in ("act_errors", "weight_errors", "simulated_errors", "measured", "rejected"):
                    if k in stats:
                        new[k] = stats[k]
                new["act_errors"] = dict(errors, **{label: err})
                if "measured" in new and label not in new["measured"]:
                    new["measured"] = [*new["measured"], label]
                new["weight_error"] = _weight_error(module, w) if werr is None else werr
                new["alone"] = _label(*choices[op.name])
                if cand[1] is not None:
                    new["smooth_alpha"] = cand[1]
                got[op.name] = (module, new)
            else:
                for name, (_m, st) in got.items():
                    st["scaled_with"] = [op.name for op in group if op.name != name]
                return got
        return alone

    @staticmethod
    def _layer_stats(op, module: QuantizedWeight, w, b, err: float) -> dict:
        """Bits, bytes, kernel and the layer's own output error on a calibration sample."""
        bytes_before = w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
        path = module.decode_path()
        kernel = "decode+float" if path == "per_call" else "float (decoded once)"
        if op.kind == LINEAR and module.activations == "dynamic" and path == "int8":
            kernel = module.kernels()[0]
        elif path == "int8":
            kernel = "int8 (decoded once)"
        elif op.kind == EMBEDDING and path == "per_call":
            kernel = "gather+decode"
        return {"kind": op.kind, "bits": module.bits, "granularity": module.granularity,
                "activations": module.activations if op.kind == LINEAR else "none",
                "act_scale": module.act_scale if module.activations == "dynamic" else None,
                "kernel": kernel, "smoothed": module.smooth is not None,
                "bytes_before": bytes_before, "bytes_after": stored_bytes(module),
                "rel_error": err, "decode": module.decode, "decode_path": path,
                "int8_error": module.decode_info()["int8_error"],
                "held_bytes": module.held_bytes()}


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.iconcat, operator.setitem, operator.delitem}
_READ_ONLY_MODULES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd,
                      CompressedModule)


def _never_written(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """True when no user of ``node`` can write into its value in place (so layers that
    read it may share one quantisation of it)."""
    for user in node.users:
        t = user.target
        if user.op == "call_module":
            if not isinstance(gm.get_submodule(t), _READ_ONLY_MODULES):
                return False
        elif user.op in ("call_function", "call_method"):
            if user.kwargs.get("inplace") or "out" in user.kwargs:
                return False
            if isinstance(t, torch._ops.OpOverload):
                if t._schema.is_mutable:
                    return False
                continue
            name = t if isinstance(t, str) else getattr(t, "__name__", "")
            if name in ("setitem", "__setitem__") or t in _INPLACE_OPERATORS or (
                    name.endswith("_") and not name.endswith("__")):
                return False
    return True


#: Below 8 bits, without ``max_layer_error``: a layer of at most TINY_LAYER_WEIGHTS weights
#: whose output error on the calibration inputs exceeds TINY_LAYER_ERROR keeps 8 bits
#: (listed in stats["promoted"]). Such a layer saves at most 2 KB at 4 bits; a
#: squeeze-excite reduction (EfficientNet's 2x48 conv over a pooled, all-positive input,
#: its outputs near cancelling) had 62 % output error at 4 bits from 10 % weight error.
#: Over ten models (EfficientNet, MobileNet-v3, RegNet, ResNet, a keyword spotter,
#: ConvNeXt-V2, MobileViT, SegFormer, BERT, Llama; random weights) no layer outside
#: EfficientNet's squeeze-excite reductions reached 0.2 at 4 bits.
#: Only where the output error is over TINY_LAYER_RATIO times the weight's own (outputs
#: near cancelling, 62 % from 10 %): at 2 bits every layer's output error is about its
#: weight error, 0.3 and up, and a small model would have kept 8 bits everywhere.
TINY_LAYER_WEIGHTS = 4096
TINY_LAYER_ERROR = 0.25
TINY_LAYER_RATIO = 2.0
#: Output values (rows x channels) a layer's candidates are measured on at most: a wide
#: layer (a language model's head) gets fewer calibration rows, so that the float and
#: candidate outputs held during the search stay a few MB.
CANDIDATE_OUTPUTS = 1 << 20
#: act_scale="auto" keeps the cheapest candidate whose error is at most (1 + AUTO_SLACK)
#: times the best candidate's.
AUTO_SLACK = 0.25
#: A smoothed candidate is dropped when its decoded weight's relative error exceeds the
#: unsmoothed one's by this factor (smoothing fitted to what calibration showed must not
#: give up the weights of input columns the calibration left idle).
SMOOTH_WEIGHT_SLACK = 1.5
#: Smoothing treats an input column as at least this fraction of the layer's mean
#: per-column absmax, so a column the calibration left idle is not scaled to nothing.
SMOOTH_INPUT_FLOOR = 0.1
#: SmoothQuant strengths act_scale="auto" tries with per-tensor activations.
AUTO_ALPHAS = (0.5, 0.75)
#: Activation-aware scaling strengths tried on weight-only linear layers (the most
#: faithful on the calibration sample is kept).
WEIGHT_ONLY_ALPHAS = (0.25, 0.5)


def _input_groups(ops) -> dict[str, tuple]:
    """``{name: group}`` for the linear layers (two or more, none tied or fused) that read
    one input node with one input width: q, k and v of an attention block."""
    by_input: dict = {}
    for op in ops:
        if op.kind == LINEAR and op.form != "fused" and len(op.tied) <= 1 \
                and isinstance(op._input, torch.fx.Node):
            by_input.setdefault(op._input, []).append(op)
    out: dict[str, tuple] = {}
    for members in by_input.values():
        names = {op.name for op in members}
        if len(names) < 2 or len({op.weight().reshape(op.weight().shape[0], -1).shape[1]
                                  for op in members}) != 1:
            continue
        group = tuple({op.name: op for op in members}.values())
        for op in group:
            out[op.name] = group
    return out


def _column_absmax(w2: torch.Tensor) -> torch.Tensor:
    """max |w| per column, from two reductions (no |w| copy of the weight)."""
    return torch.maximum(w2.amax(0), w2.amin(0).neg_())


def _norm32(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of ``t``, accumulated in float32 or wider (a float64 model's tensors
    keep their precision: torch refuses to narrow them)."""
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32))


def _label(act: str, alpha: float | None) -> str:
    return act if alpha is None else f"{act}+smooth{alpha:g}"  # e.g. tensor+smooth0.5


def _weight_error(module: QuantizedWeight, w: torch.Tensor, norm: float | None = None) -> float:
    """Relative L2 error of the module's decoded weight against the float weight ``w``
    (``norm``: ``w``'s, when known). Decoded about a million weights at a time and
    compared in place: no decoded copy of the whole weight, no float64 copy of either."""
    with torch.no_grad():
        if norm is None:
            norm = float(_norm32(w))
        w2 = w.reshape(w.shape[0], -1)
        sq = 0.0
        for start, rows in _decoded_blocks(module):
            diff = rows.sub_(w2[start:start + rows.shape[0]])
            sq += float(torch.linalg.vector_norm(diff)) ** 2
    return math.sqrt(sq) / norm if norm > 0 else 0.0


def _decoded_blocks(module: QuantizedWeight):
    """``module._decoded_rows()``; int8 codes with a scale per row or tensor (the default
    grid) are decoded in one multiply of the stored bytes (no int32 copy between), the
    same values."""
    if not (module.bits == 8 and module.scheme == "symmetric"
            and module.granularity in ("channel", "tensor") and module.zero_point is None):
        yield from module._decoded_rows()
        return
    q, scale, smooth = module.qweight, module.scale, module.smooth
    rows = q.shape[0]
    per_row = scale.shape[0] > 1
    step = max(1, (1 << 20) // max(q.shape[1], 1))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        block = torch.mul(q[start:end], scale[start:end] if per_row else scale)
        yield start, block.div_(smooth) if smooth is not None else block


def _kernel_for(shape: tuple[int, int], scheme: str, rows: int) -> str:
    """The int8 kernel a dynamic linear of weight ``shape`` runs a call of ``rows`` rows
    with (:meth:`~fxpress.passes.int8.Int8Kernels.kernels`), before the module exists."""
    probe = types.SimpleNamespace(shape=list(shape), cols=int(shape[1]),
                                  zero_point=None if scheme == "symmetric" else 0)
    return Int8Kernels.kernels(probe, rows)[0]


def _rel_error(out: torch.Tensor, b: torch.Tensor | None, ref: torch.Tensor,
               ref_norm: float) -> float:
    """Relative L2 error of ``out + b`` against ``ref`` (``out`` is overwritten)."""
    with torch.no_grad():
        if b is not None:
            out += b
        err = float(_norm32(out.sub_(ref)))
    return err / ref_norm if ref_norm > 0 else 0.0


#: Weights and input rows the float simulation of a layer's int8 candidates runs on at
#: most (strided subsets of the weight's output channels and of the calibration sample's
#: rows; the finalists' kernels run on all of both).
SIMULATED_WEIGHTS = 1 << 17
SIMULATED_ROWS = 128
#: Sample rows up to which the cheapest candidate's output error is measured by the float
#: simulation over every row and channel instead of the int8 kernel: on one thread here the
#: float product (with decoding) of 16-128 rows took 0.1-0.7x the kernel's prepacking and
#: run on GPT-2's and MiniLM's layer shapes, 0.8-1.1x at 256 and 0.85-1.65x at 512
#: (MiniLM's sample: its quantize pass took 1.26x as long measured that way).
WHOLE_SIMULATION_ROWS = 256
#: A candidate whose simulated error exceeds this many times the bound the kernel's
#: measurements set is not built (the estimates run 0.75-1.8x the kernel's error on
#: MiniLM's FFN layers).
SIMULATION_MARGIN = 2.0
#: Weights a block of :func:`_quantize_measured` holds: its temporaries stay in a core's
#: L2 cache, so the dozen elementwise steps read the weight from memory about once.
MEASURE_BLOCK = 1 << 16


def _quantize_measured(w2: torch.Tensor, smooth: torch.Tensor | None,
                       xs: dict[str, torch.Tensor], bits: int, scheme: str, scale_mode: str
                       ) -> tuple[float, dict[str, torch.Tensor]]:
    """Per-channel quantisation of ``w2 · smooth`` (the codes of :func:`quantize_stored`)
    measured as it is made, a few rows at a time, nothing kept: the decoded weight's
    relative error against ``w2``, and for each simulated input in ``xs``
    (:func:`simulated_input`) its product with the decoded weight (the kernel's output,
    without the bias)."""
    rows, cols = w2.shape
    step = max(1, MEASURE_BLOCK // max(cols, 1))
    outs = {a: x.new_empty((x.shape[0], rows)) for a, x in xs.items()}
    sq = 0.0
    with torch.no_grad():
        for start in range(0, rows, step):
            end = min(rows, start + step)
            blk = w2[start:end]
            codes, s, zero = _quantize(blk if smooth is None else blk * smooth, bits, scheme,
                                       "channel", 0, scale_mode)
            dec = codes if zero is None else codes.sub_(zero)
            dec = dec.mul_(s.reshape(-1, 1))  # the stored (smoothed) weight, decoded
            for a, x in xs.items():
                outs[a][:, start:end] = x @ dec.t()
            if smooth is not None:
                dec = dec.div_(smooth)
            sq += float(torch.linalg.vector_norm(dec.sub_(blk))) ** 2
        norm = float(_norm32(w2))
    return (math.sqrt(sq) / norm if norm > 0 else 0.0), outs


def _stored_measured(w2: torch.Tensor, xs: dict[str, torch.Tensor], ch: int, scale_mode: str,
                     norm: float, whole: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, float, dict[str, torch.Tensor],
                                torch.Tensor | None]:
    """8-bit symmetric per-channel codes of ``w2`` as :func:`quantize_stored` stores them
    (the same blocks), and in the same pass what measuring them needs: the decoded
    weight's relative error against ``w2`` (``norm``: its norm), the value
    :func:`_weight_error` gives, and each simulated input's product with the decoded
    rows ``::ch`` (:func:`_quantize_measured` of ``w2[::ch]``); with ``whole`` (a
    simulated input, :func:`simulated_input` of the whole sample), also its product with
    every decoded row. Returns (stored codes, scales, weight error, outputs, the whole
    product or None)."""
    rows, cols = w2.shape
    step = max(1, (1 << 20) // max(cols, 1))
    stored = torch.empty((rows, cols), dtype=torch.int8)
    # an input that is ``whole`` itself: its rows ``::ch`` are taken from the whole product
    sub_xs = {a: x for a, x in xs.items() if x is not whole}
    outs = {a: x.new_empty((x.shape[0], len(range(0, rows, ch)))) for a, x in sub_xs.items()}
    out_whole = None if whole is None else whole.new_empty((whole.shape[0], rows))
    scales, sq = [], 0.0
    with torch.no_grad():
        for start in range(0, rows, step):
            blk = w2[start:start + step]
            codes, s, _ = _quantize(blk, 8, "symmetric", "channel", 0, scale_mode)
            stored[start:start + blk.shape[0]] = codes  # whole numbers: exact in int8
            s = s.float()
            scales.append(s)
            dec = codes.mul_(s.reshape(-1, 1))  # int8 codes times their scale, as decoded
            if out_whole is not None:
                out_whole[:, start:start + blk.shape[0]] = whole @ dec.t()
            first = (-start) % ch
            sub = dec[first::ch]
            if len(sub) and sub_xs:
                j = (start + first) // ch
                for a, x in sub_xs.items():
                    outs[a][:, j:j + len(sub)] = x @ sub.t()
            sq += float(torch.linalg.vector_norm(dec.sub_(blk))) ** 2
    for a, x in xs.items():
        if a not in outs:
            outs[a] = out_whole[:, ::ch].clone()
    return stored, torch.cat(scales), (math.sqrt(sq) / norm if norm > 0 else 0.0), outs, out_whole


def _codes_product(stored: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
                   w2: torch.Tensor, norm: float) -> tuple[torch.Tensor, float]:
    """``x`` times the decoded 8-bit symmetric per-channel codes ``stored`` (scales
    ``scale``, one per row) transposed, and the decoded weight's relative error against
    ``w2`` (``norm``: its norm), decoded about a million weights at a time as
    :func:`_weight_error` decodes them (each code times its row's scale: the values
    :func:`_stored_measured` multiplies by)."""
    rows, cols = stored.shape
    out = x.new_empty((x.shape[0], rows))
    step = max(1, (1 << 20) // max(cols, 1))
    sq = 0.0
    with torch.no_grad():
        for start in range(0, rows, step):
            end = min(rows, start + step)
            dec = torch.mul(stored[start:end], scale[start:end].reshape(-1, 1))
            out[:, start:end] = x @ dec.t()
            sq += float(torch.linalg.vector_norm(dec.sub_(w2[start:end]))) ** 2
    return out, (math.sqrt(sq) / norm if norm > 0 else 0.0)


def _simulate(module: QuantizedWeight, xs: dict[str, torch.Tensor], w2: torch.Tensor
              ) -> tuple[float, dict[str, torch.Tensor]]:
    """:func:`_quantize_measured` of a module already built (per-tensor scales): its
    decoded weight's relative error against ``w2`` and each simulated input's product
    with it, decoded a block of rows at a time. ``xs`` are multiplied by the module's
    smoothing (the blocks are decoded unsmoothed)."""
    with torch.no_grad():
        sm = module.smooth
        xs = {a: x if sm is None else x * sm for a, x in xs.items()}
        outs = {a: x.new_empty((x.shape[0], module.shape[0])) for a, x in xs.items()}
        sq = 0.0
        for start, rows in _decoded_blocks(module):
            end = start + rows.shape[0]
            for a, x in xs.items():
                outs[a][:, start:end] = x @ rows.t()
            sq += float(torch.linalg.vector_norm(rows.sub_(w2[start:end]))) ** 2
        norm = float(_norm32(w2))
    return (math.sqrt(sq) / norm if norm > 0 else 0.0), outs


def simulated_input(x2: torch.Tensor, act: str, smooth: torch.Tensor | None,
                    kernel: str, step: int = 1,
                    ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x2`` as a dynamic int8 linear with ``act`` scaling sees it, in float: divided by
    ``smooth``, quantised as ``kernel`` quantises it (one affine scale over ``[min(x, 0),
    max(x, 0)]`` in 255 steps, 127 where fbgemm reduces its range; per token, fbgemm's
    one scale over the rows divided by their absmax, the others' 127 steps per side),
    decoded: its product with the decoded stored (smoothed) weight is the kernel's
    product up to float rounding. Only the rows ``::step`` are made (a per-tensor scale
    still comes from every row). ``ranges``: ``(x2.amin(0), x2.amax(0))`` when the caller
    holds them (a layer's candidates share them)."""
    from fxpress.passes.int8 import _REDUCE_RANGE, ONEDNN_LEVELS

    levels = 127 if kernel == "fbgemm" and _REDUCE_RANGE else (
        ONEDNN_LEVELS if kernel == "onednn" else 255)
    if act == "tensor" or kernel == "fbgemm":
        if act == "tensor":
            # the range of x / smooth over every row, from per-column extremes (dividing
            # by a positive factor keeps the order); the rows' own quantised with it
            lo, hi = ranges if ranges is not None else (x2.amin(0), x2.amax(0))
            sub = x2[::step]
            if smooth is not None:
                lo, hi, sub = lo / smooth, hi / smooth, sub / smooth
            amax = None
        else:  # fbgemm per token: rows divided by their absmax, then one affine scale
            xs = x2 if smooth is None else x2 / smooth
            amax = per_token_absmax(xs)
            lo, hi = xs.amin(1, keepdim=True) / amax, xs.amax(1, keepdim=True) / amax
            sub, amax = xs[::step] / amax[::step], amax[::step]
        # two more rows holding the whole range: quantize_per_tensor's scale and zero point
        # are those of every row, and those rows are dropped again
        ends = sub.new_zeros(2, sub.shape[1])
        ends[0, 0], ends[1, 0] = lo.min(), hi.max()
        q, scale, zero = quantize_per_tensor(torch.cat([sub, ends]), levels, signed=False)
        out = q[:-2].float().sub_(zero).mul_(scale)
        return out if amax is None else out.mul_(amax)
    q, sx = quantize_per_token(x2[::step] if smooth is None else x2[::step] / smooth,
                               ONEDNN_LEVELS // 2 if kernel == "onednn" else 127)
    return q.float().mul_(sx)


def _output_error(module: QuantizedWeight, x: torch.Tensor | None, ref: torch.Tensor | None,
                  denom: float | None = None) -> float:
    """Relative L2 error of ``module(x)`` against the float layer's output ``ref`` (whose
    norm is ``denom``, when known). Norms accumulate in float32 (torch's reductions sum
    in blocks: a relative error of about 1e-6 on a ratio of order 1e-2)."""
    if x is None:
        return float("nan")
    with torch.no_grad():
        out = module(x)
        if denom is None:
            denom = float(_norm32(ref))
        err = float(_norm32(out.sub_(ref)))
    return err / denom if denom > 0 else 0.0


def _share(module: QuantizedWeight) -> QuantizedWeight:
    """A second module object over the same buffers (a weight tied between two ops)."""
    return type(module).from_state(module.config(), dict(module.named_buffers()))


__all__ = ["Quantize", "QuantizedWeight", "QuantizedLinear", "QuantizedConv",
           "QuantizedEmbedding", "quantize_weight", "quantize_stored", "dequantize_weight",
           "store_codes", "load_codes", "code_range", "quantize_per_token", "quantize_per_tensor",
           "per_token_absmax", "AUTO_SLACK", "AUTO_ALPHAS", "WEIGHT_ONLY_ALPHAS",
           "int8_backend", "INT8_BACKENDS", "RUNTIME_MODULES"]
