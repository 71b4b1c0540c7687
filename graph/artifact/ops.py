"""The reviewed list of what a graph node may call: functions, Tensor methods, ATen ops.

Closed: a name is callable from a file only if it is written below. Each entry was
reviewed against three rules:

1. **memory-safe**: it reads and writes only inside the tensors it is given or allocates,
   with bounds checked by torch (no raw sizes + strides + offsets: ``as_strided``,
   ``_reshape_alias``, ``set_``, ``from_file``, ``empty_strided``, ``frombuffer``; no
   unchecked indexing: ``_unsafe_index``, sparse constructors without invariant checks,
   ``ctc_loss``, whose CPU kernel reads the log-probabilities at the targets' labels
   unchecked (a crafted label of 10**8 crashed the process); no
   uninitialised memory that would leak the process's heap: ``empty``, ``new_empty``,
   ``resize_``; no raw pointers or storages: ``data_ptr``, ``storage``);
2. **calls nothing it is handed**: no callables taken or invoked (``fork``, ``wait``, hooks,
   ``compile``, ``vmap``, ``torch.func``, ``cond`` / ``while_loop`` / ``map`` higher-order
   ops, ``apply_``, ``map_``, ``operator.attrgetter`` / ``methodcaller`` / ``call``);
3. **touches nothing outside**: no files, seeds, global settings, threads, the autograd
   engine (``backward``), devices' shared memory.

Names use the spelling artifacts store: ``torch.X``, ``torch.nn.functional.X``,
``operator.X``, ``math.X``, ``builtins.X``, ``torch.ops.aten.<packet>.<overload>``.
ATen packets are listed by name; every overload of a listed packet is allowed except the
``out=`` ones (they write into a caller's tensor, which graphs never need). Private ATen ops
are listed one by one: each is what ``torch.export`` emits for public ops of real models
(BERT, DistilBERT, GPT-2, Llama, Qwen2, T5, ViT, ResNet, ConvNeXt, Whisper's encoder,
wav2vec2's weight-normed conv, all-MiniLM-L6-v2).
"""
from __future__ import annotations

# Ops with the same name as a torch function, a Tensor method and an ATen packet (most of
# them): element-wise math, comparisons, reductions, shapes, indexing with checked bounds.
_COMMON = """
abs absolute neg negative exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square sin cos tan
asin acos atan arcsin arccos arctan sinh cosh tanh asinh acosh atanh arcsinh arccosh arctanh
sigmoid logit erf erfc erfinv floor ceil round trunc fix frac sign sgn signbit reciprocal
relu nan_to_num isnan isinf isfinite isposinf isneginf isreal logical_not bitwise_not clamp
clamp_min clamp_max clip positive conj conj_physical resolve_conj resolve_neg angle
deg2rad rad2deg digamma lgamma i0 sinc xlogy heaviside exp2 mvlgamma polygamma
add sub subtract mul multiply div divide true_divide floor_divide remainder fmod pow
float_power atan2 arctan2 maximum minimum fmax fmin eq ne lt le gt ge greater greater_equal
less less_equal not_equal equal logical_and logical_or logical_xor bitwise_and bitwise_or
bitwise_xor bitwise_left_shift bitwise_right_shift hypot lerp addcmul addcdiv where rsub
copysign isclose allclose ldexp nextafter
sum mean nanmean nansum prod max min amax amin aminmax argmax argmin std var std_mean
var_mean norm logsumexp cumsum cumprod cummax cummin logcumsumexp all any count_nonzero
median nanmedian mode topk sort argsort msort kthvalue quantile nanquantile dist renorm
view reshape flatten unflatten squeeze unsqueeze permute transpose t swapaxes swapdims movedim
moveaxis expand expand_as repeat repeat_interleave tile contiguous chunk split
split_with_sizes tensor_split hsplit vsplit dsplit unbind narrow narrow_copy select
index_select gather scatter scatter_add scatter_reduce index_add index_copy index_fill
index index_put index_reduce take take_along_dim masked_select masked_scatter masked_fill cat
concat concatenate stack hstack vstack dstack column_stack row_stack flip fliplr flipud roll
rot90 diagonal diag diag_embed diagflat tril triu view_as reshape_as type_as clone detach
alias broadcast_to broadcast_tensors atleast_1d atleast_2d atleast_3d meshgrid einsum outer
ger matmul mm bmm addmm addmv addbmm baddbmm addr mv dot vdot inner tensordot kron cross cdist
searchsorted bucketize histc bincount nonzero argwhere unique unique_consecutive
zeros_like ones_like full_like rand_like randn_like randint_like zeros ones full arange
range linspace logspace eye tril_indices triu_indices scalar_tensor tensor as_tensor
cartesian_prod combinations block_diag cov corrcoef trace diff gcd lcm
softmax log_softmax layer_norm group_norm batch_norm instance_norm rms_norm dropout
feature_dropout alpha_dropout feature_alpha_dropout embedding embedding_bag conv1d conv2d
conv3d convolution conv_transpose1d conv_transpose2d conv_transpose3d max_pool1d max_pool2d
max_pool3d avg_pool1d adaptive_avg_pool1d adaptive_max_pool1d pixel_shuffle pixel_unshuffle
channel_shuffle native_channel_shuffle prelu selu celu rrelu threshold hardshrink
constant_pad_nd pdist cosine_similarity pairwise_distance cosine_embedding_loss
scaled_dot_product_attention lstm gru rnn_tanh rnn_relu lstm_cell gru_cell rnn_tanh_cell
rnn_relu_cell bilinear frobenius_norm nuclear_norm det logdet slogdet inverse pinverse
cholesky matrix_power matrix_exp mean var std trapz trapezoid cumulative_trapezoid
count_nonzero bernoulli multinomial normal poisson rand randn randint randperm
"""

#: in-place forms (``torch.relu_``, ``aten.add_``): they write into a tensor they are given,
#: like the op writes its result (DENY still removes ``set_``, ``resize_``, ``as_strided_``)
_INPLACE = frozenset(n + "_" for n in _COMMON.split()) | frozenset(
    "alpha_dropout_ feature_alpha_dropout_ feature_dropout_ detach_ fill_ index_put_ rrelu_ "
    "selu_ celu_ threshold_ conj_physical_".split())

#: torch.X (functions in fx graphs)
TORCH = frozenset(_COMMON.split()) | _INPLACE | frozenset("""
is_tensor is_floating_point is_complex is_nonzero numel result_type can_cast promote_types
finfo iinfo broadcast_shapes sym_int sym_float sym_max sym_min sym_not sym_ite sym_sum
""".split())

#: torch.nn.functional.X
FUNCTIONAL = frozenset("""
linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d
unfold fold avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d
max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices lp_pool1d lp_pool2d
lp_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d dropout dropout1d dropout2d dropout3d alpha_dropout
feature_alpha_dropout threshold relu relu6 hardtanh hardswish elu selu celu leaky_relu prelu
rrelu glu gelu logsigmoid hardshrink tanhshrink softsign softplus softmin softmax
gumbel_softmax log_softmax tanh sigmoid hardsigmoid silu mish batch_norm instance_norm
layer_norm group_norm rms_norm local_response_norm embedding embedding_bag one_hot pad
interpolate upsample upsample_nearest upsample_bilinear grid_sample affine_grid
pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle normalize
cosine_similarity pairwise_distance pdist scaled_dot_product_attention
multi_head_attention_forward softshrink triplet_margin_loss cross_entropy nll_loss mse_loss
l1_loss smooth_l1_loss huber_loss kl_div binary_cross_entropy binary_cross_entropy_with_logits
poisson_nll_loss gaussian_nll_loss cosine_embedding_loss margin_ranking_loss hinge_embedding_loss
multilabel_margin_loss soft_margin_loss multilabel_soft_margin_loss multi_margin_loss
""".split())

#: Tensor methods (call_method)
METHODS = frozenset(_COMMON.split()) - {"tensor", "as_tensor", "zeros", "ones", "full", "arange",
                                        "range", "linspace", "logspace", "eye", "tril_indices",
                                        "triu_indices", "scalar_tensor", "rand", "randn",
                                        "randint", "randperm", "cartesian_prod", "combinations",
                                        "block_diag", "meshgrid", "broadcast_tensors", "einsum",
                                        "cat", "concat", "concatenate", "stack", "hstack",
                                        "vstack", "dstack", "column_stack", "row_stack",
                                        "convolution", "lstm", "gru", "rnn_tanh", "rnn_relu",
                                        "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
                                        "bilinear", "scaled_dot_product_attention",
                                        "layer_norm", "group_norm", "batch_norm", "instance_norm",
                                        "rms_norm", "embedding", "embedding_bag"} | frozenset("""
size dim ndimension numel nelement element_size item is_contiguous is_floating_point
is_complex stride storage_offset float half double int long short char byte bool bfloat16
cfloat cdouble to cpu type type_as new_zeros new_ones new_full new_tensor requires_grad_
fill_ zero_ copy_ masked_fill_ index_put_ index_add_ index_copy_ index_fill_ scatter_
scatter_add_ scatter_reduce_ clamp_ clamp_min_ clamp_max_ add_ sub_ mul_ div_ pow_ neg_
abs_ exp_ log_ sqrt_ rsqrt_ sigmoid_ tanh_ relu_ floor_ ceil_ round_ trunc_ sign_ reciprocal_
fmod_ remainder_ lerp_ addcmul_ addcdiv_ addmm_ baddbmm_ tril_ triu_ unsqueeze_ squeeze_
transpose_ t_ logical_not_ logical_and_ logical_or_ bitwise_and_ bitwise_or_ bitwise_xor_
bitwise_not_ eq_ ne_ lt_ le_ gt_ ge_ uniform_ normal_ bernoulli_ exponential_ random_
unfold softmax log_softmax sum_to_size expand masked_fill view as_subclass_never
""".split()) - {"as_subclass_never"}

#: Tensor attributes ``builtins.getattr`` may read (plain data or tensors, never methods)
TENSOR_ATTRIBUTES = frozenset("""
shape dtype device ndim T mT H mH real imag is_cuda is_cpu is_meta is_sparse is_quantized
requires_grad layout data grad
""".split())

#: torch.fft.X (spectral layers: FNet's token mixing, Fourier neural operators, spectral
#: convolutions). torch checks ``n`` / ``s`` / ``dim``; sizes a file states are bounded at
#: load like every allocation (graph/artifact/kernels.py)
_FFT_1D = "fft ifft rfft irfft hfft ihfft"
_FFT_ND = "fft2 ifft2 fftn ifftn rfft2 irfft2 rfftn irfftn hfft2 ihfft2 hfftn ihfftn"
FFT = frozenset(f"{_FFT_1D} {_FFT_ND} fftshift ifftshift".split())

OPERATOR = frozenset("""
add sub mul truediv floordiv mod pow neg pos abs invert inv not_ and_ or_ xor lshift rshift
eq ne lt le gt ge getitem setitem contains matmul iadd isub imul itruediv ifloordiv imod ipow
iand ior ixor ilshift irshift imatmul is_ is_not truth index concat
""".split())

MATH = frozenset("""
sqrt exp log log2 log10 log1p expm1 pow ceil floor trunc isnan isinf isfinite tanh sin cos
tan erf erfc gcd prod fabs copysign hypot atan2 fmod
""".split())

#: builtins.getattr only with a constant name from TENSOR_ATTRIBUTES (checked per node)
BUILTINS = frozenset("getattr len int float bool abs min max round pow divmod".split())

#: Python-level private helpers fx graphs record
EXTRA = frozenset({"torch._assert"})

#: ATen packets (torch.ops.aten.<packet>.<overload>)
ATEN = frozenset(_COMMON.split()) | _INPLACE | frozenset("""
linear linalg_vector_norm linalg_norm vector_norm gelu silu mish hardtanh hardswish hardsigmoid leaky_relu elu softplus glu log_sigmoid
relu6 celu softshrink tanh_backward_never
native_layer_norm native_group_norm native_batch_norm native_dropout
upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d
upsample_bicubic2d upsample_trilinear3d reflection_pad1d reflection_pad2d reflection_pad3d
replication_pad1d replication_pad2d replication_pad3d pad avg_pool2d avg_pool3d
adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool2d adaptive_max_pool3d
max_pool2d_with_indices max_pool3d_with_indices im2col col2im grid_sampler grid_sampler_2d
affine_grid_generator one_hot normal_functional
slice slice_scatter select_scatter diagonal_scatter index_put_ masked_fill_ copy fill fill_
zero zero_ copy_ add_ sub_ mul_ div_ clamp_ lift_fresh_copy new_zeros new_ones new_full
full_like sym_size sym_numel sym_stride sym_storage_offset scalar_tensor item
to detach_ unsqueeze_ squeeze_ t_ transpose_ expand_copy view_copy permute_copy
unsqueeze_copy squeeze_copy transpose_copy slice_copy select_copy split_copy unbind_copy
alias_copy clone
numpy_T matrix_H mT mH adjoint unfold view_as_real view_as_complex complex polar real imag
""".split()) - {"tanh_backward_never"} | frozenset(f"fft_{n}" for n in FFT)

#: private ATen ops, each reviewed (memory-safe, calls nothing) and emitted by export
#: graphs of the models named above
ATEN_PRIVATE = frozenset("""
_assert_tensor_metadata _assert_scalar _assert_async _functional_assert_async _make_dep_token
_local_scalar_dense _softmax _log_softmax _to_copy _unsafe_view
_native_batch_norm_legit_no_training _native_batch_norm_legit_functional _native_batch_norm_legit
_scaled_dot_product_flash_attention_for_cpu _adaptive_avg_pool2d _adaptive_avg_pool3d
_fused_rms_norm _weight_norm _weight_norm_interface _log_softmax_backward_data_never
""".split()) - {"_log_softmax_backward_data_never"}

#: ATen dunder packets (operator overloads)
ATEN_DUNDERS = frozenset(f"__{op}__" for op in ("and", "or", "xor", "lshift", "rshift", "iand",
                                                   "ior", "ixor", "ilshift", "irshift"))

#: never, whatever a list above says: raw memory, callables, files, global state
DENY = frozenset("""
as_strided as_strided_ as_strided_scatter as_strided_copy empty_strided _reshape_alias
set_ from_file frombuffer storage untyped_storage data_ptr resize_ resize_as_ empty
empty_like new_empty new_empty_strided _unsafe_index _unsafe_index_put sparse_coo_tensor
sparse_csr_tensor sparse_compressed_tensor fork wait compile vmap cond while_loop map
apply_ map_ map2_ register_hook register_post_accumulate_grad_hook backward
share_memory_ pin_memory record_stream tolist numpy save load manual_seed seed
ctc_loss _ctc_loss
""".split())
