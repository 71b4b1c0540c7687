"""Export a compressed model to ONNX, for stock ONNX Runtime (``pip install 'fxpress[onnx]'``).

``fxpress.export_onnx(res, "model.onnx")`` (or ``fxpress export-onnx model.fxp -o model.onnx``)
turns a compressed GraphModule, a :class:`~fxpress.PipelineResult` or a saved artifact into
an ONNX model whose compressed layers keep fxpress's own integers and scales:

* ``QuantizedLinear`` with int8 activations (``activations=dynamic``): the input is
  quantised at run time exactly as fxpress does it and multiplied in integers by
  ``MatMulInteger`` against fxpress's codes (symmetric codes as uint8 with zero point 128:
  ONNX Runtime's uint8 x int8 product saturates on x86 CPUs without VNNI, its uint8 x
  uint8 product is exact on every CPU), then scaled by fxpress's per-channel scales.
  Per-tensor activations use ``DynamicQuantizeLinear`` (one affine uint8 scale, what
  fxpress's per-tensor mode computes; layers reading one input share it, like q, k and v
  do in fxpress), per-token activations one symmetric scale per row; smoothed layers
  divide their input columns first (or the LayerNorm before them does, when it feeds only
  layers smoothed by one factor). ONNX Runtime fuses the chain into its
  ``DynamicQuantizeMatMul`` kernel, the same one its own ``quantize_dynamic`` output uses.
* weight-only ``QuantizedLinear`` (``granularity=group`` and ``activations=none``) at 2, 4
  or 8 bits: ``com.microsoft.MatMulNBits`` with fxpress's codes, group scales and zero
  points (per-channel or per-tensor scales are repeated per block, which is exact);
  other widths (3, 5-7 bits) and group sizes MatMulNBits cannot take are decoded to float.
* ``QuantizedEmbedding`` (per row or per tensor): ``Gather`` of the integer rows, then
  the scale (and zero point) of the rows looked up, as fxpress decodes them.
* every other compressed module (codebooks, binarized layers, quantized convs, a plugin's
  module): the nearest form ONNX runs, the decoded float weight.

Multi-head attention over projected inputs (BERT's) becomes one
``com.microsoft.MultiHeadAttention`` node over the integer projections.

Batch and sequence axes stay dynamic (every input axis the model allows). After export
the model is run by ONNX Runtime on the example inputs and compared with fxpress's own
outputs; the metrics are returned in :attr:`OnnxExport.check`.

>>> out = fxpress.export_onnx(res, "model.onnx")          # doctest: +SKIP
>>> out.check["rel_l2"], out.layers["bert.encoder.layer.0.attention.self.query"]  # doctest: +SKIP
(0.0009, 'MatMulInteger (per-tensor input)')
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from fxpress.errors import ArtifactError, ExportError, InputError, MissingExtraError
from fxpress.graph.artifact.files import write_atomic
from fxpress.onnx_attention import fuse_attention
from fxpress.onnx_lowering import (_ATTENTION, _DOMAIN, _PLACEHOLDER, AttentionSpec,
                                    _embedding_block, _fill_placeholders, _nbits_block, _np)
from fxpress.onnx_padding import padding_plan
from fxpress.onnx_padding import skip_padding as apply_padding_plan

#: How to get what this module needs.
INSTALL_HINT = "pip install 'fxpress[onnx]'"
#: Opset of the default ONNX domain the exporter writes (LayerNormalization, Gelu: >= 20).
OPSET = 20


def _require() -> None:
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError("ONNX export", "onnx", missing)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the path (or None), the ONNX model, the form each
    compressed layer took, the input/output names, and ``check``: ONNX Runtime's outputs
    against fxpress's on the example inputs (max_abs, rel_l2, cosine, cosine_min)."""

    path: Path | None
    model: Any
    layers: dict[str, str] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    check: dict[str, float] = field(default_factory=dict)
    #: the mask input whose pad tokens the per-token ops skip ("" where none: the graph
    #: runs every token, see :mod:`fxpress.onnx_padding`)
    padding: str = ""

    def summary(self) -> str:
        forms: dict[str, int] = {}
        for form in self.layers.values():
            forms[form] = forms.get(form, 0) + 1
        lines = [f"{n} x {form}" for form, n in sorted(forms.items(), key=lambda kv: -kv[1])]
        check = ", ".join(f"{k} {v:.4g}" for k, v in self.check.items())
        where = f"wrote {self.path}" if self.path else "ONNX model"
        return "\n".join([f"{where}: inputs {self.input_names}, outputs {self.output_names}",
                          *("  " + line for line in lines),
                          *([f"  per-token ops on the real tokens of {self.padding!r} only (pad tokens "
                             f"skipped)"] if self.padding else []),
                          f"  onnxruntime vs fxpress on the example inputs: {check}"])


# -- the placeholder op ------------------------------------------------------------------------

_registry: dict[int, torch.nn.Module] = {}
_registry_lock = threading.Lock()
_keys = itertools.count()
_op_defined = False


def _define_op() -> None:
    """Define ``fxpress_onnx::compressed_layer(x, key)`` (calls the registered module) and
    its ONNX schema, once per process."""
    global _op_defined
    if _op_defined:
        return
    from onnx.defs import OpSchema, register_schema

    from fxpress.graph.runtime import op_forward

    @torch.library.custom_op("fxpress_onnx::compressed_layer", mutates_args=())
    def compressed_layer(x: torch.Tensor, key: int) -> torch.Tensor:
        return _registry[key](x).clone()

    @compressed_layer.register_fake
    def _(x, key):
        mod = _registry[key]
        shape = _weight_shape(mod)
        w = x.new_empty(shape, dtype=torch.float32)
        return op_forward(mod.kind, mod.spec, x if x.is_floating_point() else x, w, None)

    @torch.library.custom_op("fxpress_onnx::attention", mutates_args=())
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  key: int) -> torch.Tensor:
        spec = _registry[key]
        heads = spec.heads

        def split(t):  # [B, S, H*d] -> [B, H, S, d]
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            split(q), split(k), split(v), attn_mask=mask, scale=spec.scale)
        return (out.transpose(1, 2).flatten(2) if spec.merged else out).contiguous()

    @attention.register_fake
    def _(q, k, v, mask, key):
        spec = _registry[key]
        if spec.merged:
            return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
        return q.new_empty((q.shape[0], spec.heads, q.shape[1], v.shape[2] // spec.heads))

    register_schema(OpSchema(
        _ATTENTION, _DOMAIN, 1, doc="scaled dot-product attention over projected q, k, v "
        "[batch, sequence, heads * dim] (replaced by MultiHeadAttention after export)",
        inputs=[OpSchema.FormalParameter("q", "T"), OpSchema.FormalParameter("k", "T"),
                OpSchema.FormalParameter("v", "T"),
                OpSchema.FormalParameter("mask", "M", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(float)", "tensor(bool)"], "")],
        attributes=[OpSchema.Attribute("key", OpSchema.AttrType.INT, "attention key")]))
    register_schema(OpSchema(
        _PLACEHOLDER, _DOMAIN, 1, doc="a compressed fxpress layer (replaced after export)",
        inputs=[OpSchema.FormalParameter("x", "T")],
        outputs=[OpSchema.FormalParameter("y", "tensor(float)")],
        type_constraints=[("T", ["tensor(float)", "tensor(int64)", "tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("key", OpSchema.AttrType.INT, "layer key")]))
    _op_defined = True


def _translation() -> dict:
    import onnxscript

    opset = onnxscript.values.Opset(_DOMAIN, 1)

    def lower(x, key: int):
        return getattr(opset, _PLACEHOLDER)(x, key=key)

    def lower_attention(q, k, v, mask, key: int):
        if mask is None:
            return getattr(opset, _ATTENTION)(q, k, v, key=key)
        return getattr(opset, _ATTENTION)(q, k, v, mask, key=key)

    return {torch.ops.fxpress_onnx.compressed_layer.default: lower,
            torch.ops.fxpress_onnx.attention.default: lower_attention}


def _weight_shape(mod) -> list[int]:
    shape = getattr(mod, "shape", None)
    if shape is not None:
        return list(shape)
    with torch.no_grad():
        return list(mod.weight_float().shape)


class _Decoded(torch.nn.Module):
    """A compressed layer as its decoded float weight (the form ONNX runs for codebooks,
    binarized layers and convs)."""

    def __init__(self, mod):
        super().__init__()
        from fxpress.graph.runtime import op_forward

        self._forward = op_forward
        self.kind, self.spec = mod.kind, dict(mod.spec)
        with torch.no_grad():
            self.register_buffer("weight", mod.weight_float().detach().float().contiguous())
            bias = getattr(mod, "bias", None)
            self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x):
        return self._forward(self.kind, self.spec, x, self.weight, self.bias)


# -- choosing each layer's ONNX form -----------------------------------------------------------

def _form(mod) -> str:
    """How a compressed module is exported: "int8", "nbits", "gather" or "decoded"."""
    from fxpress.passes.quantize_modules import QuantizedEmbedding, QuantizedLinear

    if getattr(mod, "latent", None) is not None:
        return "decoded"
    if isinstance(mod, QuantizedLinear):
        if mod.activations == "dynamic" and mod.granularity != "group":
            return "int8"
        if _nbits_block(mod) is not None:
            return "nbits"
        return "decoded"
    if isinstance(mod, QuantizedEmbedding) and mod.smooth is None and (
            mod.granularity in ("channel", "tensor") or _embedding_block(mod) is not None):
        return "gather"
    return "decoded"


def _lowered(gm: torch.fx.GraphModule, attention: bool = False
             ) -> tuple[torch.fx.GraphModule, dict[int, tuple[str, Any]]]:
    """A structural copy of ``gm`` in which every compressed layer is either the placeholder
    op (integer forms, filled in after export) or a float op on its decoded weight, and
    (``attention``) every multi-head attention over projected inputs the attention
    placeholder (ONNX Runtime's ``MultiHeadAttention``)."""
    from fxpress.graph.capture import clone_structure
    from fxpress.graph.runtime import CompressedModule

    _define_op()
    out = clone_structure(gm)
    keys: dict[int, tuple[str, Any]] = {}
    for node in list(out.graph.nodes):
        if node.op != "call_module":
            continue
        mod = out.get_submodule(node.target)
        if not isinstance(mod, CompressedModule):
            continue
        form = _form(mod)
        if form == "decoded":
            _set_module(out, str(node.target), _Decoded(mod))
            keys[-len(keys) - 1] = (str(node.target), (mod, form))
            continue
        key = next(_keys)
        with _registry_lock:
            _registry[key] = mod
        keys[key] = (str(node.target), (mod, form))
        with out.graph.inserting_before(node):
            new = out.graph.call_function(torch.ops.fxpress_onnx.compressed_layer.default,
                                          (node.args[0], key))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        out.graph.erase_node(node)
    if attention:
        def register(spec: AttentionSpec, name: str) -> int:
            key = next(_keys)
            with _registry_lock:
                _registry[key] = spec
            keys[key] = (name, (spec, "attention"))
            return key

        fuse_attention(out.graph, register, torch.ops.fxpress_onnx.attention.default)
    out.graph.eliminate_dead_code()
    out.delete_all_unused_submodules()
    out.recompile()
    return out, keys


def _set_module(gm, qualname: str, module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


# -- building the integer subgraphs ------------------------------------------------------------

def _as_graph_module(model) -> torch.fx.GraphModule:
    from fxpress.passes.records import PipelineResult

    if isinstance(model, (str, Path)):
        import fxpress

        path = Path(model)
        if not path.is_file():
            raise InputError(f"export_onnx: artifact {str(path)!r} does not exist or is not a file")
        return fxpress.load(path)
    if isinstance(model, PipelineResult):
        return model.module
    if isinstance(model, torch.fx.GraphModule):
        return model
    raise InputError(f"export_onnx: expected a compressed GraphModule, a PipelineResult or an "
                     f"artifact path, got {type(model).__name__}; capture a plain model first "
                     f"(fxpress.capture(model, example_inputs))")


def example_inputs_from(gm: torch.fx.GraphModule) -> tuple:
    """Example inputs built from the shapes and dtypes capture stored on the placeholders:
    floats random (seeded), integers ones (a valid index and an all-ones mask)."""
    from fxpress.graph.capture import node_shape

    gen = torch.Generator().manual_seed(0)
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        shape, dtype = node_shape(node)
        if shape is None or not all(isinstance(s, int) for s in shape):
            raise InputError(f"export_onnx: the graph does not record the shape of input "
                             f"'{node.name}'; pass example_inputs=")
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.ones(shape, dtype=dtype))
        else:
            out.append(torch.ones(shape, dtype=dtype))
    return tuple(out)


def _dynamic_shapes(inputs: tuple) -> tuple:
    """Batch (axis 0) and, for integer inputs (token ids, masks), sequence (axis 1) stay
    dynamic where the model allows (``Dim.AUTO``); feature and image axes are fixed."""
    from torch.export import Dim

    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        axes = [0] + ([1] if t.dim() > 1 and not t.is_floating_point() else [])
        return {i: Dim.AUTO for i in axes}

    return tuple(spec(t) for t in inputs)


def _name_axes(model, input_names: list[str]) -> None:
    """Rename the symbolic dims of the inputs: axis 0 "batch", axis 1 of integer inputs
    "sequence" (in every value of the graph that uses them)."""
    rename: dict[str, str] = {}
    for inp in model.graph.input:
        tt = inp.type.tensor_type
        for i, d in enumerate(tt.shape.dim):
            if d.dim_param and d.dim_param not in rename:
                if i == 0:
                    rename[d.dim_param] = "batch"
                elif i == 1 and tt.elem_type in (6, 7):  # int32 / int64: token ids, masks
                    rename[d.dim_param] = "sequence"
                else:
                    rename[d.dim_param] = f"{inp.name}_dim{i}"
    if len(set(rename.values())) != len(rename):  # two unrelated batch axes: keep numbering
        seen: dict[str, int] = {}
        for k, v in list(rename.items()):
            seen[v] = seen.get(v, 0) + 1
            if seen[v] > 1:
                rename[k] = f"{v}{seen[v]}"
    for vi in itertools.chain(model.graph.input, model.graph.output, model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings: keep them out of the caller's terminal."""
    from fxpress.graph.capture import quiet

    with quiet() as (buf, _caught):
        yield buf


def _outputs(gm, inputs) -> tuple[list[torch.Tensor], list[str] | None]:
    """fxpress's outputs on ``inputs`` (the tensors, in the order ONNX lists them) and the
    names :func:`export_onnx` gives them (:func:`_output_names`)."""
    from fxpress.graph.capture import _flat_graph_inputs, eval_mode
    from fxpress.graph.outputs import plain_outputs

    from fxpress.passes.decode import int8_kernels_only

    # int8 layers export as their integer kernels: compare with them at every call size
    with torch.no_grad(), eval_mode(gm), int8_kernels_only():
        out = gm(*_flat_graph_inputs(gm, inputs))
    # a dataclass output (no pytree node) field by field, not as one leaf that is no tensor
    out = plain_outputs(out)
    return ([t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)],
            _output_names(out))


def _output_names(out) -> list[str] | None:
    """The ONNX output names of a model that returns ``out``: "output" for one tensor,
    "output_0", "output_1", ... for a tuple, a mapping's keys (transformers'
    ``last_hidden_state``, ``logits``), joined by "." when nested. torch.onnx names them
    after the graph's last nodes ("linear_2", "div_1"), which changed with any rewrite and
    told an ONNX Runtime user nothing. None fields (a ModelOutput's ``loss``) have no output.
    None (torch.onnx's names) where a leaf is neither a tensor nor None or two names would
    clash."""
    try:
        flat, _ = pytree.tree_flatten_with_path(out)
    except (NotImplementedError, ValueError, TypeError):  # a node type without key paths
        return None
    if not all(v is None or isinstance(v, torch.Tensor) for _, v in flat):
        return None
    flat = [(path, v) for path, v in flat if v is not None]  # ONNX has no output for a None
    if not flat:
        return None
    if len(flat) == 1 and not flat[0][0]:
        return ["output"]

    def part(key) -> str:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    names = []
    for path, _ in flat:
        parts = [part(k) for k in path]
        name = ".".join(parts) if isinstance(path[0], (pytree.MappingKey, pytree.GetAttrKey)) \
            else "output_" + "_".join(parts)
        names.append("".join(c if c.isalnum() or c in "._-" else "_" for c in name))
    return names if len(set(names)) == len(names) else None


def _check(session, input_names, inputs, ref: list[torch.Tensor]) -> dict[str, float]:
    feeds = {name: _np(t) for name, t in zip(input_names, _flat_inputs(inputs))}
    got = session.run(None, feeds)
    a = torch.cat([_rows(torch.as_tensor(g)) for g in got], 1)
    r = torch.cat([_rows(t) for t in ref], 1)
    if a.shape != r.shape:
        raise ExportError(f"export_onnx: onnxruntime returned shape {tuple(a.shape)}, fxpress "
                          f"{tuple(r.shape)}")
    # the verifier's metrics, on each sample's outputs as one row (one value per sample:
    # as one column over the batch, see compare)
    from fxpress.passes.verify import compare

    m = compare([[a]], [[r]], top1=False)
    return {"max_abs": m.max_abs, "rel_l2": m.rel_l2, "cosine": m.cosine, "cosine_min": m.cosine_min}


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0] if t.dim() else 1, -1)


def _flat_inputs(inputs) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tuple(inputs)) if isinstance(t, torch.Tensor)]


def session(model, threads: int | None = None, optimized: bool = True, spin: bool = True):
    """An ``onnxruntime.InferenceSession`` on an exported model (a path, bytes or a
    ModelProto), with ``threads`` intra-op threads and all graph optimizations.
    ``spin=False``: idle worker threads sleep instead of spinning (several sessions, or a
    loaded machine, then do not take each other's cores)."""
    _require()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    data = model if isinstance(model, (str, bytes)) else (
        str(model) if isinstance(model, Path) else model.SerializeToString())
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def export_onnx(model, path: str | Path | None = None, example_inputs: Any = None, *,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                fuse: bool = True, accuracy_level: int = 0, skip_padding: bool = True,
                check: bool = True) -> OnnxExport:
    """Export a compressed model (a GraphModule from :func:`fxpress.compress`, a
    :class:`PipelineResult`, or an artifact path) to ONNX and return :class:`OnnxExport`.

    ``example_inputs``: a tuple of inputs to trace with (default: built from the shapes the
    graph recorded at capture). Every input axis the model allows stays dynamic: batch and
    sequence. ``path``: where to write the ``.onnx`` file (weights inside it). ``fuse``:
    fuse multi-head attention into ``com.microsoft.MultiHeadAttention`` (moving a following
    layer's smoothing into the value projection) and apply ONNX Runtime's transformer
    fusions (LayerNorm, Gelu, SkipLayerNorm, ...) where its optimizer finds them.
    ``accuracy_level``: MatMulNBits' compute type for 4-bit
    layers (0: float, exact; 4: int8 activations, faster and less faithful). ``check``: run
    the model in ONNX Runtime on the example inputs and compare with fxpress's outputs
    (:attr:`OnnxExport.check`).
    """
    _require()
    from fxpress.graph.custom_functions import inference_graph

    gm = inference_graph(_as_graph_module(model), "export_onnx")  # autograd.Functions: forward ops
    if example_inputs is None:
        example_inputs = example_inputs_from(gm)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif not isinstance(example_inputs, (tuple, list)):
        raise InputError(f"export_onnx: example_inputs must be a tensor or a tuple of tensors, "
                         f"got {type(example_inputs).__name__}")
    inputs = tuple(example_inputs)
    if not 0 <= int(accuracy_level) <= 4:
        raise InputError(f"export_onnx: accuracy_level must be 0-4 (MatMulNBits), got {accuracy_level}")
    _define_op()
    flat = _flat_inputs(inputs)
    names = list(input_names) if input_names else [
        n.name for n in gm.graph.nodes if n.op == "placeholder"][:len(flat)]
    if len(names) != len(flat):
        raise InputError(f"export_onnx: {len(names)} input names for {len(flat)} inputs")
    ref, named = _outputs(gm, inputs)
    if not check:
        ref = []
    if not output_names and named and not set(named) & set(names):
        output_names = named
    mp, forms, fused, padding = _build(gm, inputs, names, output_names, fuse, fuse, accuracy_level,
                                       skip_padding)
    try:
        checked = _run_check(mp, inputs, ref) if check else {}
    except ExportError:
        if not fused:
            raise
        # an attention ONNX Runtime's MultiHeadAttention does not take: the plain ops
        mp, forms, _, padding = _build(gm, inputs, names, output_names, False, fuse, accuracy_level)
        checked = _run_check(mp, inputs, ref)
    result = OnnxExport(None, mp, forms, names, [o.name for o in mp.graph.output], checked, padding)
    if path is not None:
        path = Path(path)
        try:
            data = mp.SerializeToString()
        except ValueError as e:  # protobuf's 2 GB limit
            raise ExportError(f"export_onnx: cannot serialise the model for {str(path)!r}: "
                              f"{_first_line(e)}") from None
        try:  # a symbolic link is replaced, never written through; a FIFO or device refused
            write_atomic(path, data)
        except ArtifactError as e:
            raise ExportError(f"export_onnx: {e}") from None
        result.path = path
    return result


def _build(gm, inputs: tuple, names: list[str], output_names, attention: bool, fuse: bool,
           accuracy_level: int, skip_padding: bool = False):
    """The ONNX model of ``gm`` (placeholders filled, axes named, fused; ``skip_padding``:
    per-token ops on real tokens only where that is exact, :mod:`fxpress.onnx_padding`):
    ``(model, forms, whether an attention was fused, the mask input padding is skipped by
    or "")``."""
    lowered, keys = _lowered(gm, attention=attention)
    try:
        for mod in lowered.modules():  # a copy: exported graphs refuse train()
            mod.training = False
        args = tuple(_flat_graph_args(lowered, inputs))
        with _quiet() as log:
            try:
                prog = torch.onnx.export(
                    lowered, args, dynamo=True, opset_version=OPSET,
                    custom_translation_table=_translation(), dynamic_shapes=_dynamic_shapes(args),
                    input_names=names, output_names=list(output_names) if output_names else None,
                    optimize=True, verbose=False, report=False)
            except Exception as e:  # noqa: BLE001 (torch.onnx raises many kinds)
                raise ExportError(f"export_onnx: torch.onnx could not export the graph: "
                                  f"{_first_line(e)}\n{_tail(log.getvalue())}") from e
        mp = prog.model_proto
        _name_axes(mp, names)
        plan = padding_plan(mp.graph, keys) if skip_padding and attention else None
        if plan is not None:
            apply_padding_plan(mp, plan)
        # QAttention's one matmul over q, k and v reads the padded input: with padding
        # skipped, the three layers run on the real tokens before MultiHeadAttention
        forms = _fill_placeholders(mp, {k: v for k, v in keys.items() if k >= 0} | {
            k: v for k, v in keys.items() if k < 0}, accuracy_level, qattention=plan is None)
    finally:
        with _registry_lock:
            for k in keys:
                _registry.pop(k, None)
    if fuse:
        mp = _fuse(mp)
    return (mp, forms, any(form == "attention" for _name, (_m, form) in keys.values()),
            plan["mask"] if plan is not None else "")


def _run_check(mp, inputs: tuple, ref: list[torch.Tensor]) -> dict[str, float]:
    """ONNX Runtime's outputs on ``inputs`` against fxpress's (``ref``)."""
    try:
        sess = session(mp)
        return _check(sess, [i.name for i in sess.get_inputs()], inputs, ref)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 (onnxruntime's errors have no common base)
        raise ExportError(f"export_onnx: onnxruntime cannot run the exported model: "
                          f"{_first_line(e)}") from e


def _flat_graph_args(gm, inputs) -> list:
    from fxpress.graph.capture import _flat_graph_inputs

    return list(_flat_graph_inputs(gm, inputs))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _fuse(mp):
    """ONNX Runtime's offline transformer fusions (onnxruntime.transformers), where its
    optimizer recognises the graph; the model unchanged where it does not."""
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.onnx_model_bert import BertOnnxModel
    except ImportError:
        return mp
    try:
        with _quiet():
            opts = FusionOptions("bert")
            # fxpress fuses attention itself (_fuse_attention): ORT's fusion looks for the
            # float MatMul + Add projections of older exporters
            opts.enable_attention = False
            copy = type(mp)()
            copy.CopyFrom(mp)
            m = BertOnnxModel(copy)
            m.optimize(opts, add_dynamic_axes=False)
            m.topological_sort()
            return m.model
    except Exception:  # noqa: BLE001 (an optimizer that does not apply leaves the model as it was)
        return mp
