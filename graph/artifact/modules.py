"""The closed schema of module configs: which torch.nn classes a file may name, which fields
each may set, and what a runtime module's config may hold.

A torch.nn module is rebuilt without running its constructor: ``cls.__new__``, the base
``Module.__init__``, then its fields. A field is one of the public attributes that the
class's constructor sets from its arguments (listed below per class, reviewed against
torch's sources: the constructor's parameters and what it derives from them, such as a
conv's ``transposed``), holding plain data: None, bool, int, float, str, tuples and lists
of those. Nothing else becomes an attribute: no private name, no method or property of the
class, no callable (TransformerEncoderLayer's ``activation`` is the one function-valued
field and may only be ``relu`` or ``gelu``), no dict. The few private attributes a
constructor derives (a conv's reversed padding, an RNN's flat weight names) are computed
here from the public fields, never read from the file; files that store them still load.

A runtime module (:class:`~fxpress.graph.runtime.RuntimeModule`, registered by a pass
plugin) is rebuilt by its own ``from_state`` from its ``config()``: the keys must be
public names that are not methods, properties or internals of the class, the values plain
data (JSON: numbers, strings, lists, tuples, dicts of them, as the RuntimeModule contract
says; a dict is a value under a checked public name, never an object's namespace),
integers within +-2**40,
and a ``shape`` whose float32 weight fits the load's decoded-bytes limit.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fxpress.errors import (ArtifactFormatError, ArtifactLimitError, ArtifactSecurityError,
                            ForbiddenTargetError)
from fxpress.graph.artifact.rnn import check_rnn_module

_CONV = ("in_channels out_channels kernel_size stride padding dilation transposed output_padding "
         "groups padding_mode")
_BN = "num_features eps momentum affine track_running_stats"
_POOL_MAX = "kernel_size stride padding dilation return_indices ceil_mode"
_UPSAMPLE = "name size scale_factor mode align_corners recompute_scale_factor"
_RNN = "mode input_size hidden_size num_layers bias batch_first dropout bidirectional proj_size"
_RNN_DERIVED = "_flat_weight_refs _flat_weights_names _all_weights _flat_weights"

#: torch.nn class name -> (public fields, private fields derived here and never read)
TORCH_NN: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    name: (frozenset(pub.split()), frozenset(priv.split())) for name, pub, priv in [
        ("Identity", "", ""), ("Sequential", "", ""), ("ModuleList", "", ""), ("ModuleDict", "", ""),
        ("Linear", "in_features out_features", ""),
        ("Bilinear", "in1_features in2_features out_features", ""),
        *((f"Conv{d}d", _CONV, "_reversed_padding_repeated_twice") for d in (1, 2, 3)),
        *((f"ConvTranspose{d}d", _CONV, "_reversed_padding_repeated_twice") for d in (1, 2, 3)),
        *((f"BatchNorm{d}d", _BN, "") for d in (1, 2, 3)),
        *((f"InstanceNorm{d}d", _BN, "") for d in (1, 2, 3)),
        ("LayerNorm", "normalized_shape eps elementwise_affine", ""),
        ("RMSNorm", "normalized_shape eps elementwise_affine", ""),
        ("GroupNorm", "num_groups num_channels eps affine", ""),
        ("LocalResponseNorm", "size alpha beta k", ""),
        ("Embedding", "num_embeddings embedding_dim padding_idx max_norm norm_type "
                      "scale_grad_by_freq sparse", ""),
        ("EmbeddingBag", "num_embeddings embedding_dim max_norm norm_type scale_grad_by_freq "
                         "padding_idx mode sparse include_last_offset", ""),
        *((n, "p inplace", "") for n in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
                                          "AlphaDropout", "FeatureAlphaDropout")),
        *((n, "inplace", "") for n in ("ReLU", "SELU", "SiLU", "Mish", "Hardswish", "Hardsigmoid")),
        *((n, "", "") for n in ("Sigmoid", "Tanh", "Softmax2d", "Softsign", "Tanhshrink",
                                "LogSigmoid")),
        *((n, "min_val max_val inplace", "") for n in ("ReLU6", "Hardtanh")),
        ("LeakyReLU", "negative_slope inplace", ""), ("PReLU", "num_parameters init", ""),
        ("ELU", "alpha inplace", ""), ("CELU", "alpha inplace", ""), ("GELU", "approximate", ""),
        *((n, "dim", "") for n in ("Softmax", "LogSoftmax", "Softmin", "GLU")),
        ("Softplus", "beta threshold", ""), ("Hardshrink", "lambd", ""),
        ("Softshrink", "lambd", ""), ("Threshold", "threshold value inplace", ""),
        ("RReLU", "lower upper inplace", ""),
        *((f"MaxPool{d}d", _POOL_MAX, "") for d in (1, 2, 3)),
        ("AvgPool1d", "kernel_size stride padding ceil_mode count_include_pad", ""),
        *((f"AvgPool{d}d", "kernel_size stride padding ceil_mode count_include_pad "
                           "divisor_override", "") for d in (2, 3)),
        *((f"AdaptiveAvgPool{d}d", "output_size", "") for d in (1, 2, 3)),
        *((f"AdaptiveMaxPool{d}d", "output_size return_indices", "") for d in (1, 2, 3)),
        *((f"LPPool{d}d", "norm_type kernel_size stride ceil_mode", "") for d in (1, 2)),
        ("Flatten", "start_dim end_dim", ""), ("Unflatten", "dim unflattened_size", ""),
        *((n, _UPSAMPLE, "") for n in ("Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d")),
        ("PixelShuffle", "upscale_factor", ""), ("PixelUnshuffle", "downscale_factor", ""),
        ("ChannelShuffle", "groups", ""),
        *((f"{k}Pad{d}d", "value padding", "") for k in ("Zero", "Constant") for d in (1, 2, 3)),
        *((f"{k}Pad{d}d", "padding", "") for k in ("Reflection", "Replication", "Circular")
          for d in (1, 2, 3)),
        ("CosineSimilarity", "dim eps", ""), ("PairwiseDistance", "norm eps keepdim", ""),
        ("Fold", "output_size kernel_size dilation padding stride", ""),
        ("Unfold", "kernel_size dilation padding stride", ""),
        ("MultiheadAttention", "embed_dim kdim vdim num_heads dropout batch_first head_dim bias_k "
                               "bias_v add_zero_attn", "_qkv_same_embed_dim"),
        ("RNN", "nonlinearity " + _RNN, _RNN_DERIVED), ("LSTM", _RNN, _RNN_DERIVED),
        ("GRU", _RNN, _RNN_DERIVED),
        ("RNNCell", "input_size hidden_size bias nonlinearity", ""),
        ("LSTMCell", "input_size hidden_size bias", ""), ("GRUCell", "input_size hidden_size bias", ""),
        ("TransformerEncoderLayer", "norm_first activation_relu_or_gelu activation", ""),
        ("TransformerDecoderLayer", "norm_first activation", ""),
        ("TransformerEncoder", "num_layers norm enable_nested_tensor use_nested_tensor mask_check", ""),
        ("TransformerDecoder", "num_layers norm", ""),
        ("Transformer", "d_model nhead batch_first", ""),
        # MultiheadAttention's out_proj (a Linear that quantization tools leave alone)
        ("NonDynamicallyQuantizableLinear", "in_features out_features", ""),
    ]}

#: function-valued fields: (class, field) -> the functions allowed there
FUNCTION_FIELDS = {("TransformerEncoderLayer", "activation"): (F.relu, F.gelu),
                   ("TransformerDecoderLayer", "activation"): (F.relu, F.gelu)}

INT_BOUND = 1 << 40
_BASE_KEYS = frozenset(vars(torch.nn.Module()).keys())


def plain(v: Any, where: str, depth: int = 0, dicts: bool = False) -> Any:
    """``v`` if it is plain data (None, bool, int, float, str, tuples/lists of those; dicts
    of them where ``dicts``), else :class:`ArtifactSecurityError`."""
    if v is None or isinstance(v, (bool, str, float)):
        return v
    if isinstance(v, int):
        if not -INT_BOUND <= v <= INT_BOUND:
            raise ArtifactLimitError(f"{where}: integer {v} is out of range (|x| <= 2**40)")
        return v
    if isinstance(v, (tuple, list)) and depth < 8:
        for x in v:
            plain(x, where, depth + 1, dicts)
        return v
    if isinstance(v, dict) and dicts and depth < 8:
        for k, x in v.items():
            if not isinstance(k, (str, int, float, bool)) or k is None:
                raise ArtifactSecurityError(f"{where}: dict key {k!r} is not a scalar")
            plain(x, where, depth + 1, dicts)
        return v
    if isinstance(v, torch.dtype) and depth == 0:
        return v
    raise ArtifactSecurityError(f"{where}: {type(v).__name__} values are not plain data; a "
                                "config holds numbers, strings, tuples of them and dtypes")


def check_torch_nn(cls: type, cname: str, config: dict, where: str) -> dict:
    """The fields of a torch.nn module of class ``torch.nn.<cname>``, checked; derived
    private fields dropped (:func:`finish_torch_nn` computes them)."""
    public, derived = TORCH_NN.get(cname, (frozenset(), frozenset()))
    out = {}
    for k, v in config.items():
        if k in derived:
            continue
        if k not in public and _class_attr(cls, k) is not _ABSENT:
            raise ForbiddenTargetError(f"{where}: field {k!r} would replace a method or class "
                                        f"attribute of {cls.__name__}; never set from a file")
        if k not in public:
            raise ForbiddenTargetError(
                f"{where}: field {k!r} is not in torch.nn.{cname}'s schema (its fields: "
                f"{', '.join(sorted(public)) or 'none'}); private names, methods and extra "
                "attributes are never set from a file")
        allowed = FUNCTION_FIELDS.get((cname, k))
        if allowed is not None and callable(v):
            if v not in allowed:
                raise ArtifactSecurityError(f"{where}: field {k!r} may only be one of "
                                            f"{[f.__name__ for f in allowed]}")
        else:
            plain(v, f"{where} field {k!r}")
        out[k] = v
    return out


def finish_torch_nn(m: torch.nn.Module) -> None:
    """Compute the private attributes the constructor of ``m``'s class derives."""
    from torch.nn.modules.conv import _ConvNd
    from torch.nn.modules.rnn import RNNBase

    if isinstance(m, _ConvNd):
        if isinstance(m.padding, str):
            rev = [0, 0] * len(m.kernel_size)
            if m.padding == "same":
                for d, k, i in zip(m.dilation, m.kernel_size, range(len(m.kernel_size) - 1, -1, -1)):
                    total = d * (k - 1)
                    rev[2 * i], rev[2 * i + 1] = total // 2, total - total // 2
            m._reversed_padding_repeated_twice = rev
        else:
            m._reversed_padding_repeated_twice = tuple(x for x in reversed(m.padding) for _ in range(2))
    elif isinstance(m, torch.nn.MultiheadAttention):
        m._qkv_same_embed_dim = m.kdim == m.embed_dim and m.vdim == m.embed_dim
    elif isinstance(m, RNNBase):
        names, groups = [], []
        for layer in range(m.num_layers):
            for direction in range(2 if m.bidirectional else 1):
                suffix = "_reverse" if direction == 1 else ""
                ps = ["weight_ih_l{}{}", "weight_hh_l{}{}"]
                if m.bias:
                    ps += ["bias_ih_l{}{}", "bias_hh_l{}{}"]
                if m.proj_size > 0:
                    ps += ["weight_hr_l{}{}"]
                ps = [p.format(layer, suffix) for p in ps]
                names.extend(ps)
                groups.append(ps)
        check_rnn_module(m, type(m).__name__)
        m._flat_weights_names, m._all_weights = names, groups
        for n in names:
            if n not in m._parameters:
                raise ArtifactFormatError(f"{type(m).__name__}: parameter {n!r} is missing")
        m._init_flat_weights()


def check_runtime(cls: type, config: dict, where: str, decoded_limit: int) -> dict:
    """A runtime module's config, checked (see the module docstring)."""
    for k, v in config.items():
        attr = _class_attr(cls, k)
        if k.startswith("_") or k in _BASE_KEYS or not (
                attr is _ABSENT or attr is None or isinstance(attr, (bool, int, float, str, tuple))):
            raise ForbiddenTargetError(f"{where}: config key {k!r} names a private, internal or "
                                        f"method attribute of {cls.__name__}; never set from a file")
        plain(v, f"{where} config {k!r}", dicts=True)
    shape = config.get("shape")
    if shape is not None:
        if not isinstance(shape, (list, tuple)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ArtifactFormatError(f"{where}: config 'shape' must be non-negative ints")
        if math.prod(shape) * 4 > decoded_limit:
            raise ArtifactLimitError(f"{where}: config 'shape' {list(shape)} decodes to more than "
                                     f"the limit of {decoded_limit} bytes; pass max_bytes= to "
                                     "load() if you trust the file")
    return config



def runtime_load_bytes(cls: type, config: dict, where: str) -> int:
    """Bytes a runtime module's ``from_state`` decodes from ``config`` at load
    (:meth:`~fxpress.graph.runtime.RuntimeModule.load_bytes`), as a checked int."""
    fn = getattr(cls, "load_bytes", None)
    if fn is None:
        return 0
    try:
        n = fn(config)
    except Exception as e:
        raise ArtifactFormatError(f"{where}: config does not describe the tensors it decodes "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ArtifactFormatError(f"{where}: config decodes to {n!r} bytes")
    return n


_ABSENT = object()


def _class_attr(cls: type, name: str) -> Any:
    """``name`` in the class dicts of ``cls``'s MRO (no descriptor runs), else _ABSENT."""
    for base in cls.__mro__:
        if name in vars(base):
            return vars(base)[name]
    return _ABSENT


__all__ = ["TORCH_NN", "check_torch_nn", "finish_torch_nn", "check_runtime", "plain",
           "runtime_load_bytes"]
