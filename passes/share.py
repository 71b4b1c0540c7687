"""share: k-means weight sharing (Deep Compression, Han et al. 2016).

``share{bits=4}`` clusters each layer's weights into ``2**bits`` centroids with 1-D
k-means and stores, per weight, a ``bits``-bit index into that codebook: the seed
article's "merge similar weights into their mean", done as the paper does it.

* k-means is 1-D, exact and deterministic: linear initialisation over [min, max] (the
  paper found it best: it keeps the rare large weights), then Lloyd iterations on the
  sorted values (up to :data:`HIST_BINS` values) or on a fine histogram of them (more:
  three passes instead of a sort, ~50x a pass). Cluster boundaries are midpoints between
  neighbouring centroids, so each iteration is one ``searchsorted`` of the boundaries into
  the sorted values or bins and the cluster sums come from a cumulative sum: O(k log n)
  per iteration. The final assignment is exact (a bin a boundary cuts is split by it) and
  every centroid is exactly the mean of its members.
* Pruned weights stay exactly zero: when a layer has zeros, code 0 is reserved for 0.0
  and the non-zero weights are clustered by sign (negative and positive centroids share
  the remaining codes in proportion to their value ranges), so no non-zero weight can be
  merged into zero or into a cluster that straddles it.
* ``scope="global"`` fits one codebook on every selected layer together.
* The runtime modules (:class:`CodebookLinear`, :class:`CodebookConv` and
  :class:`CodebookEmbedding`) store the codebook and the indices packed at ``bits`` bits.
  How they compute is their decode strategy (:mod:`fxpress.passes.decode`): ``auto`` (the
  default) re-quantizes wide linear layers once to int8 and runs the int8 path, keeps a
  decoded float copy of the others and lets embeddings unpack only the rows they look
  up; ``per_call``, ``float`` (``once``) and ``int8`` force one path. None of it is in
  ``state_dict``.
* ``bias_bits=8`` also stores each layer's bias on an affine grid of 256 levels (codes, a
  scale and a zero point: a quarter of its float bytes). On small models the float biases
  are a large share of a Deep-Compressed file (the 64-300-100-10 digits MLP: 1.6 KB of
  ~5); the grid step is (max - min)/255 of the layer's biases, rounded up to a float16 number
  (stored in 2 bytes, as the zero point).
* ``codebook_bits=8`` stores each layer's centroids as one byte each on an affine grid of
  256 levels (codes and a ``[scale, zero]`` pair of float16 numbers: 20 bytes for 16
  centroids instead of 32 of float16); 0.0 is on the grid, so a pruned layer's zero
  centroid stays exact, and fine-tuning trains the centroids through the grid.
* Centroids can be fine-tuned (:meth:`CodebookModule.begin_training`): the gradients of
  all weights that share a centroid sum into it, and a latent weight per weight, trained
  straight through, may move a weight to the neighbouring centroid (pruned weights stay
  zero); the stored form stays a codebook and packed indices.

Example::

    res = fxpress.compress(model, "prune{sparsity=0.9},share{bits=4}", calibration=batches)
    res.records[-1].stats["bits_per_weight"]      # stored bits per weight, codebook included
"""
from __future__ import annotations

import math
import time

import torch

from fxpress.errors import OptionError
from fxpress.graph.packing import (pack_bits, packed_size, rows_byte_aligned, unpack_bits,
                                    unpack_rows)
from fxpress.graph.runtime import CompressedModule, StateCheck, kind_classes, op_forward
from fxpress.passes.decode import DecodeStrategy, normalize_decode
from fxpress.graph.weights import (CONV, EMBEDDING, LINEAR, select, unique_weights,
                                   weighted_ops)
from fxpress.passes.base import (Pass, PassContext, PassResult, PassTraits, Tolerance,
                                 check_glob_matches, check_op_kinds, option)
from fxpress.passes.kmeans1d import HIST_BINS, KMeans1D, kmeans_1d, kmeans_1d_many
from fxpress.passes.quantize_grid import (dequantize_weight, load_codes, quantize_weight,
                                          store_codes, tensor_grid)

# -- runtime modules ------------------------------------------------------------------------


class CodebookModule(DecodeStrategy, CompressedModule):
    """A linear/conv/embedding whose weight is ``codebook[codes]``: a float codebook of at
    most ``2**bits`` centroids and one ``bits``-bit index per weight, packed.

    ``state_dict``: ``codebook`` [k], ``codes`` (uint8, ``ceil(n*bits/8)`` bytes) and
    ``bias``. With ``zero_code`` the centroid of code 0 is exactly 0.0 (pruned weights)
    and stays so under fine-tuning. A sparse layer is stored as Deep Compression stores
    it when that is smaller (sparsity above ``1/bits``): ``mask``, one bit per weight
    (set: non-zero), and ``codes`` of the non-zero weights only.
    """

    technique = "share"
    optional_tensors = ("bias", "mask", "bias_codes", "bias_grid", "codebook", "codebook_codes",
                        "codebook_grid")
    #: bits of the stored bias grid; 0 keeps the bias in float (artifacts before the option)
    bias_bits = 0
    #: bits of the stored codebook grid, 0 or 8; 0 stores the centroids as floats (artifacts
    #: before the option: ``codebook`` in the file)
    codebook_bits = 0

    def __init__(self, kind: str, spec: dict, shape: tuple[int, ...], bits: int,
                 codebook: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None,
                 zero_code: bool = False, cache_weight: bool = False, sparse: bool | None = None,
                 bias_bits: int = 0, codebook_bits: int = 0):
        super().__init__(kind, spec)
        self.bias_bits = int(bias_bits)
        self.codebook_bits = int(codebook_bits)
        self.shape = [int(d) for d in shape]
        self.bits = int(bits)
        self.zero_code = bool(zero_code)
        self.cache_weight = bool(cache_weight)
        n = self.numel
        if codes.numel() != n:
            raise ValueError(f"{n} weights need {n} codes, got {codes.numel()}")
        if codebook.numel() > (1 << self.bits):
            raise ValueError(f"a {bits}-bit code addresses {1 << bits} centroids, got {codebook.numel()}")
        codes = codes.reshape(-1)
        self.nonzeros = int(torch.count_nonzero(codes))
        if sparse is None:
            sparse = packed_size(n, 1) + packed_size(self.nonzeros, self.bits) < packed_size(n, self.bits)
        self.sparse = bool(sparse) and self.zero_code
        self._store_codebook(codebook.detach().clone())
        if self.sparse:
            nonzero = codes != 0
            self.register_buffer("mask", pack_bits(nonzero, 1))
            self.register_buffer("codes", pack_bits(codes[nonzero], self.bits))
        else:
            self.register_buffer("mask", None)
            self.register_buffer("codes", pack_bits(codes, self.bits))
        self._store_bias(bias)

    def _store_codebook(self, codebook: torch.Tensor) -> None:
        """Keep ``codebook`` as a buffer, or with ``codebook_bits`` as codes on one affine grid
        of that many bits with its ``[scale, zero]`` pair (what is stored: ``2**bits`` centroids
        of a 4-bit layer in 16 bytes and a 4-byte grid instead of 32 bytes of float16) plus
        the decoded centroids (a non-persistent buffer, what forward reads). The grid spans
        [min, max] of the centroids and 0, so the zero centroid of a pruned layer stays 0.0
        exactly; every other centroid moves by at most half a step ((max - min) / 510 at
        8 bits, a 34th of the spacing of 16 evenly spread centroids)."""
        for name in ("codebook", "codebook_codes", "codebook_grid"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        self.register_buffer("codebook_codes", None)
        self.register_buffer("codebook_grid", None)
        if not self.codebook_bits:
            self.register_buffer("codebook", codebook)
            return
        codes, self.codebook_grid = tensor_grid(codebook.reshape(1, -1).float(), self.codebook_bits)
        self.codebook_codes = store_codes(codes, self.codebook_bits, "affine")
        self._decode_codebook(codebook.numel())

    def _decode_codebook(self, k: int) -> None:
        grid = self.codebook_grid
        codes = load_codes(self.codebook_codes, self.codebook_bits, "affine", k)
        table = dequantize_weight(codes, grid[:1].reshape(1, 1), grid[1:].reshape(1, 1).to(torch.int32))
        self.register_buffer("codebook", table.reshape(k), persistent=False)

    def _store_bias(self, bias: torch.Tensor | None) -> None:
        """Keep ``bias`` as a frozen parameter, or with ``bias_bits`` as grid codes and a
        ``[scale, zero]`` pair (what is stored) plus its decoded values (a non-persistent
        buffer, what forward adds)."""
        for name in ("bias", "bias_codes", "bias_grid"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        self.register_buffer("bias_codes", None)
        self.register_buffer("bias_grid", None)
        if bias is None:
            self.register_buffer("bias", None)
        elif not self.bias_bits:
            self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        else:
            codes, self.bias_grid = tensor_grid(bias.detach().reshape(1, -1), self.bias_bits)
            self.bias_codes = store_codes(codes, self.bias_bits, "affine")
            self._decode_bias(bias.numel())

    def _decode_bias(self, n: int) -> None:
        scale, zero = self.bias_grid[:1].reshape(1, 1), self.bias_grid[1:].reshape(1, 1).to(torch.int32)
        codes = load_codes(self.bias_codes, self.bias_bits, "affine", n)
        self.register_buffer("bias", dequantize_weight(codes, scale, zero).reshape(n),
                             persistent=False)

    @classmethod
    def load_bytes(cls, config: dict) -> int:
        """The float bias :meth:`from_state` decodes from ``bias_bits``-bit codes, and the
        float centroids it decodes from ``codebook_bits``-bit codes."""
        bias = int(config["shape"][0]) * 8 if config.get("bias_bits") else 0
        table = 4 << 8 if config.get("codebook_bits") == 8 else 0
        return bias + table

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor],
                   parameters=()) -> "CodebookModule":
        m = super().from_state(config, tensors, parameters)  # checked: check_state
        if m.bias_codes is not None:
            m._decode_bias(int(m.shape[0]))
        return m

    def _check_codebook(self, check: StateCheck) -> None:
        """Refuse a ``codebook_bits`` share never writes, or a stored codebook that does not
        fit it (a float ``codebook`` without it, grid codes and a ``[scale, zero]`` pair with
        it); decode the grid's centroids."""
        cbits = self.codebook_bits
        if not (isinstance(cbits, int) and not isinstance(cbits, bool) and cbits in (0, 8)):
            check.fail("config 'codebook_bits'",
                       f"codebook_bits {cbits!r} is not one share writes (0 or 8)")
        codes, grid = self._buffers.get("codebook_codes"), self._buffers.get("codebook_grid")
        if not cbits:
            if codes is not None or grid is not None:
                check.fail("tensor 'codebook_codes'", "is stored without codebook_bits")
            return
        if self._buffers.get("codebook") is not None or "codebook" in self._parameters:
            check.fail("tensor 'codebook'", f"a float codebook is stored beside codebook_bits={cbits}")
        bits = check.integer("bits", 1, 8)
        codes = check.tensor("codebook_codes", dtypes=(torch.uint8,))
        if codes.dim() != 2 or codes.shape[0] != 1 or not 1 <= codes.shape[1] <= 1 << bits:
            check.fail("tensor 'codebook_codes'", f"must be [1, k] with 1 <= k <= {1 << bits} for a "
                       f"{bits}-bit code, got {tuple(codes.shape)}")
        check.tensor("codebook_grid", dtypes=(torch.float32,), shape=[2], finite=True)
        self._decode_codebook(codes.shape[1])

    def check_state(self, check: StateCheck) -> None:
        """Also refuse stored codes that do not fit the config: every call would otherwise
        fail, or index past the codebook, long after the file loaded. A codebook stored on
        a grid (``codebook_bits``) is checked and decoded first."""
        super().check_state(check)
        self._check_codebook(check)
        n = self.numel
        # bias_bits=2**40 loaded into a decode that never returned
        bb = self.bias_bits
        if not (isinstance(bb, int) and not isinstance(bb, bool) and (bb == 0 or 2 <= bb <= 8)):
            check.fail("config 'bias_bits'", f"bias_bits {bb!r} is not one share writes (0 or 2-8)")
        bits = check.integer("bits", 1, 8)
        zero_code, sparse = check.flag("zero_code"), check.flag("sparse")
        if sparse and not zero_code:
            check.fail("config 'sparse'", "a sparse layer stores its zeros as code 0: it needs "
                       "zero_code")
        cb = self._buffers.get("codebook", self._parameters.get("codebook"))
        if cb is None or cb.dim() != 1 or cb.dtype not in (torch.float32, torch.float64) \
                or not 1 <= cb.numel() <= 1 << bits:
            check.fail("tensor 'codebook'", f"a {bits}-bit code addresses 1..{1 << bits} "
                       f"centroids, got a codebook of {None if cb is None else tuple(cb.shape)}")
        if not bool(torch.isfinite(cb).all()):
            check.fail("tensor 'codebook'", "holds non-finite values")
        count = check.integer("nonzeros", 0, n) if sparse else n
        codes = check.tensor("codes", dtypes=(torch.uint8,))
        if codes.numel() != packed_size(count, bits):
            check.fail("tensor 'codes'", f"codes do not hold {count!r} codes of {bits} bits")
        if sparse:
            mask = check.tensor("mask", dtypes=(torch.uint8,), numel=packed_size(n, 1))
            if int(unpack_bits(mask, 1, n).count_nonzero()) != count:
                check.fail("tensor 'mask'", f"the mask does not mark the {count} stored codes")
        elif self._buffers.get("mask") is not None:
            check.fail("tensor 'mask'", "is stored for a dense layer")
        if cb.numel() < 1 << bits and count and int(unpack_bits(codes, bits, count).max()) >= cb.numel():
            check.fail("tensor 'codes'", f"codes index past the codebook's {cb.numel()} centroids")
        rows = int(self.shape[0])
        if bb and self._buffers.get("bias_codes") is not None:
            if self._parameters.get("bias") is not None or self._buffers.get("bias") is not None:
                check.fail("tensor 'bias'", "is stored besides its grid codes")
            check.tensor("bias_codes", dtypes=(torch.uint8,),
                         shape=[1, rows if bb == 8 else -(-rows // 8) * bb])
            check.tensor("bias_grid", dtypes=(torch.float32,), shape=[2], finite=True)
        elif self._buffers.get("bias_codes") is not None or self._buffers.get("bias_grid") is not None:
            check.fail("tensor 'bias_codes'", "is stored without bias_bits")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _table(self) -> torch.Tensor:
        # code 0 of a layer with zeros decodes to exactly 0.0, also while it is trained
        cb = self.codebook
        if self.codebook_bits and isinstance(cb, torch.nn.Parameter):
            # trained through its grid: forward reads what end_training stores, the
            # gradient goes straight through to the float centroids
            codes, grid = tensor_grid(cb.detach().reshape(1, -1), self.codebook_bits)
            on_grid = dequantize_weight(codes, grid[:1].reshape(1, 1), grid[1:].reshape(1, 1).to(torch.int32))
            cb = on_grid.reshape(cb.shape).to(cb.dtype) + (cb - cb.detach())
        if self.zero_code:
            return torch.cat([cb.new_zeros(1), cb[1:]])
        return cb

    def _codes(self) -> torch.Tensor:
        unpacked = self._buffers.get("codes_unpacked")  # set only while fine-tuning
        if unpacked is not None:
            return unpacked
        if not self.sparse:
            return unpack_bits(self.codes, self.bits, self.numel).long()
        nonzero = unpack_bits(self.mask, 1, self.numel).bool()
        full = torch.zeros(self.numel, dtype=torch.int64, device=self.codes.device)
        full[nonzero] = unpack_bits(self.codes, self.bits, self.nonzeros).long()
        return full

    def weight_float(self) -> torch.Tensor:
        latent = self._parameters.get("latent")
        if latent is not None:  # fine-tuning: each weight on its nearest centroid (see begin_training)
            codes = self._nearest(latent.detach())
            self.codes_unpacked = codes
            lat = self.keep_zeros(latent)
            # value: codebook[codes] exactly; gradient: summed into each centroid, and
            # straight through to each weight's latent (which decides its centroid)
            return self._table().index_select(0, codes).view(self.shape) + (lat - lat.detach())
        # index_select's backward is index_add: gradients of weights sharing a centroid sum
        return self._table().index_select(0, self._codes()).view(self.shape)

    def _nearest(self, w: torch.Tensor) -> torch.Tensor:
        """The code of the nearest centroid for every weight of ``w``; with ``zero_code``
        a zero weight keeps code 0 and a non-zero one never takes it."""
        table = self._table().detach()
        first = 1 if self.zero_code else 0
        cand = table[first:]
        flat = w.reshape(-1)
        if cand.numel() == 0:
            return torch.zeros(flat.numel(), dtype=torch.int64, device=flat.device)
        values, order = torch.sort(cand)
        mids = (values[1:] + values[:-1]) / 2
        codes = order[torch.bucketize(flat.to(values.dtype), mids)] + first
        if self.zero_code:
            codes = codes.masked_fill(flat == 0, 0)
        return codes

    def gathers_rows(self) -> bool:
        return not self.sparse and rows_byte_aligned(self.shape[1], self.bits)

    def _grid_bias(self) -> torch.Tensor:
        """While fine-tuned with ``bias_bits``: the float bias on the grid :meth:`end_training`
        will store it on (fitted to its current values, as :meth:`_store_bias` fits it),
        the gradient straight through to the float bias. Forward adds what is stored (a
        bias trained in float and rounded afterwards moved, untrained, by up to half a grid
        step: 1/30 of the layer's bias range at 4 bits)."""
        b = self.bias
        codes, grid = tensor_grid(b.detach().reshape(1, -1), self.bias_bits)
        on_grid = dequantize_weight(codes, grid[:1].reshape(1, 1), grid[1:].reshape(1, 1).to(torch.int32))
        return on_grid.reshape(b.shape).to(b.dtype) + (b - b.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_codes is not None and isinstance(self.bias, torch.nn.Parameter):
            return op_forward(self.kind, self.spec, x, self.dense_weight(), self._grid_bias())
        if (self.kind == EMBEDDING and not self.codebook.requires_grad and self.gathers_rows()
                and self.decode_path() == "per_call"):
            # a lookup touches a few rows: unpack only those
            return self._table()[unpack_rows(self.codes, self.bits, self.shape[1], x).long()]
        return super().forward(x)

    def config(self) -> dict:
        extra = {"codebook_bits": self.codebook_bits} if self.codebook_bits else {}
        return {**super().config(), "shape": self.shape, "bits": self.bits,
                "zero_code": self.zero_code, "sparse": self.sparse, "nonzeros": self.nonzeros,
                "bias_bits": self.bias_bits, **extra}

    # -- fine-tuning -------------------------------------------------------------------
    def begin_training(self) -> list[torch.nn.Parameter]:
        """Make the centroids, a latent weight per weight and the bias trainable; return
        them for the optimizer.

        Forward decodes every weight as the centroid nearest to its latent (initially its
        own centroid, so nothing changes until training moves something). Decoding is a
        gather, so the gradient of a centroid is the sum of the gradients of all weights
        that share it (Deep Compression, section 3.3); the same gradient passes straight
        through to each latent, so a weight whose gradient keeps pulling it away from its
        cluster moves to the neighbouring centroid (its index is re-assigned). Pruned
        weights (code 0 of a layer with zeros) stay exactly zero and the reserved zero
        centroid never moves. :meth:`end_training` stores the trained centroids and the
        final assignment packed as before.

        Example::

            params = module.begin_training()
            opt = torch.optim.Adam(params, lr=1e-4)
            ...                                   # forward, loss.backward(), opt.step()
            module.end_training()                 # state_dict is the compressed form again
        """
        if isinstance(self.codebook, torch.nn.Parameter):
            return [p for p in (self.codebook, self._parameters.get("latent"), self.bias)
                    if p is not None]
        self.drop_cache()
        # own copies: the pipeline's graphs share tensors, and an optimizer writes in place
        codes = self._codes()
        self.register_buffer("codes_unpacked", codes, persistent=False)
        codebook = self._buffers.pop("codebook")
        for name in ("codebook_codes", "codebook_grid"):  # stored again by end_training
            self._buffers[name] = None
        self.codebook = torch.nn.Parameter(codebook.detach().clone())
        with torch.no_grad():
            w = self._table().index_select(0, codes).view(self.shape).clone()
        self._zero_mask = (codes == 0).view(self.shape) if self.zero_code else None
        self.latent = torch.nn.Parameter(w)
        if self.bias is not None:
            bias = self.bias.detach().clone()
            self._buffers.pop("bias", None)
            self.bias = torch.nn.Parameter(bias)
        return [p for p in (self.codebook, self.latent, self.bias) if p is not None]

    def end_training(self) -> None:
        """Store the trained centroids back as a buffer (code 0 of a sparse layer: 0.0;
        float32 ones rounded to float16 precision, which the artifact stores in 2 bytes)
        and each weight's final index, packed."""
        if not isinstance(self.codebook, torch.nn.Parameter):
            return
        codebook = self._parameters.pop("codebook").detach().clone()
        if codebook.dtype == torch.float32 and bool(codebook.abs().max() < 65504):
            # trained centroids are kept at float16 precision (a relative 2**-11), which
            # the artifact stores in 2 bytes each, losslessly
            codebook = codebook.to(torch.float16).to(torch.float32)
        if self.zero_code:
            codebook[0] = 0
        self._store_codebook(codebook)
        latent = self._parameters.pop("latent", None)
        if latent is not None:
            codes = self._nearest(latent.detach())
            if self.sparse:  # the same weights are non-zero: the mask stays as it is
                self.codes = pack_bits(codes[codes != 0], self.bits)
            else:
                self.codes = pack_bits(codes, self.bits)
        if self.bias is not None:
            # a trained bias goes back onto its grid: the one forward trained it through
            self._store_bias(self.bias.detach())
        self._buffers.pop("codes_unpacked", None)
        self._zero_mask = None
        self.drop_cache()

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, bits={self.bits}, clusters={self.codebook.numel()}, "
                f"codebook_bits={self.codebook_bits}, "
                f"zero_code={self.zero_code}, sparse={self.sparse}, cache_weight={self.cache_weight}")


#: CodebookLinear, CodebookConv and CodebookEmbedding (an embedding lookup unpacks only its rows)
CODEBOOK_CLASSES = kind_classes(CodebookModule, "Codebook", "with a k-means codebook weight")
CodebookLinear, CodebookConv, CodebookEmbedding = (CODEBOOK_CLASSES[k]
                                                   for k in (LINEAR, CONV, EMBEDDING))


# -- the pass -----------------------------------------------------------------------------

#: the bits ``share`` tries, in order, when none are given
AUTO_BITS = (4, 5, 6, 8)


class Share(Pass):
    """k-means weight sharing with a ``bits``-bit codebook per layer (or one for all)."""

    name = "share"
    summary = ("Weight sharing (Deep Compression): per-layer 1-D k-means codebook of 2^bits "
               "centroids, bits-bit indices packed; pruned zeros stay exactly zero.")
    # 4-bit sharing changes the digits models' outputs by ~1% (rel. L2) and MiniLM's
    # embeddings to cosine ~0.99; 2-3 bits go past this and need fine-tuning.
    traits = PassTraits(tolerance=Tolerance(min_cosine=0.98, min_top1=0.95), replaces_tensors=True,
                        runtime_modules=tuple(CODEBOOK_CLASSES.values()))

    bits = option(4, "bits per weight index; the codebook holds up to 2**bits centroids (not "
                  "given: the fewest of 4, 5, 6, 8 that keep the tolerance)", low=1, high=8)
    scope = option("layer", "'layer': one codebook per layer; 'global': one for all selected "
                   "layers", choices=("layer", "global"))
    include = option(["*"], "glob patterns on weight or layer names to share")
    exclude = option([], "glob patterns to leave alone")
    ops = option(["linear", "conv", "embedding"], "kinds of weighted ops to share")
    decode = option("auto", "how layers compute at run time: 'per_call' decodes the weight on "
                    "every forward (memory); 'float' ('once') keeps the decoded weight; 'int8' "
                    "re-quantizes it once to int8 and runs the int8 path (linear layers); "
                    "'auto': int8 for wide linear layers, float for the rest, embeddings "
                    "look up their rows (none of it stored)",
                    choices=("auto", "int8", "float", "per_call", "once"))
    max_iter = option(1000, "most Lloyd iterations per k-means fit (each costs microseconds)",
                      low=1)
    bias_bits = option(0, "store each layer's bias on an affine grid of this many bits "
                       "(2-8; 0 keeps it float32)", low=0, high=8)
    codebook_bits = option(0, "store each layer's centroids on an affine grid of 256 levels "
                           "(8: one byte each and a 4-byte grid; 0 keeps them float)", low=0, high=8)

    def check_options(self) -> None:
        check_op_kinds(self.name, self.ops)
        if self.bias_bits == 1:
            raise OptionError(self.name, "bias_bits", "a 1-bit grid holds only the smallest and "
                              "largest bias; use 2-8, or 0 to keep biases in float")
        if self.codebook_bits not in (0, 8):
            raise OptionError(self.name, "codebook_bits", f"{self.codebook_bits} is not stored "
                              "smaller than 8 (a centroid's code takes a byte either way); use 8, "
                              "or 0 to keep centroids in float")

    def run(self, gm, ctx: PassContext) -> PassResult:
        if "bits" not in self._given:
            return self._run_auto(gm, ctx)
        return self._run(gm, ctx)

    def _run_auto(self, gm, ctx: PassContext) -> PassResult:
        """No ``bits`` given: the fewest bits of :data:`AUTO_BITS` whose one-shot result keeps
        this pass's own tolerance with a quarter of its slack to spare (as prune chooses its
        sparsity); 8 when none does (the verifier then judges it). A 4-bit codebook that keeps
        a trained model's outputs moves a random-weight model's by 10-30 % (rel. L2)."""
        from fxpress.graph.capture import clone_structure
        from fxpress.passes.verify import misses, one_shot_check

        before, strict = one_shot_check(self.tol, gm, ctx)
        given = dict(self._given)
        tried: dict[int, float] = {}  # bits -> the cosine the tolerance reads
        result = None
        for bits in AUTO_BITS:
            trial = Share(**given, bits=bits, tol=dict(self._tol_given))
            result = trial._run(gm if bits == AUTO_BITS[-1] else clone_structure(gm), ctx)
            result.module.recompile()  # the pipeline recompiles what a pass hands back
            m = before.compare_to_reference(before.run(result.module))
            tried[bits] = round(m.value_for("min_cosine"), 6)
            if not misses(strict, m):
                break
        result.stats["auto_bits"] = {
            "chosen": bits, "tried": tried,
            "why": (f"no bits given: the fewest of {list(AUTO_BITS)} whose outputs on "
                    f"{len(before.batches)} calibration batch(es) keep this pass's tolerance "
                    "with a quarter of its slack to spare"
                    + ("" if not misses(strict, m) else "; none did, so 8 bits"))}
        return result

    def _run(self, gm, ctx: PassContext) -> PassResult:
        all_ops = weighted_ops(gm, self.ops, fused=True)
        chosen, unmatched = select(all_ops, self.include, self.exclude)
        check_glob_matches(self.name, unmatched, [op.name for op in all_ops])
        weights = {op.key: op.weight().detach() for op in unique_weights(chosen)}
        k = 1 << self.bits
        start = time.perf_counter()
        with torch.no_grad():
            if self.scope == "global" and weights:
                joined = torch.cat([w.reshape(-1).float() for w in weights.values()])
                fit = kmeans_1d(joined, k, self.max_iter)
                del joined
                fits = {name: fit for name in weights}
            else:
                fits = dict(zip(weights, kmeans_1d_many(list(weights.values()), k, self.max_iter)))
            encoded = {}
            for name, w in weights.items():
                fit = fits[name]
                codes = (fit.codes.view(w.shape) if fit.codes is not None and self.scope == "layer"
                         else fit.encode(w, torch.uint8))
                fit.codes = None
                codebook = fit.centroids.to(w.dtype)
                # tied weights (one tensor, several ops) share one set of stored tensors
                encoded[name] = (codebook, codes)
        kmeans_seconds = time.perf_counter() - start

        layers: dict[str, dict] = {}
        built: dict[str, CodebookModule] = {}
        for op in chosen:
            w = weights[op.key]
            codebook, codes = encoded[op.key]
            bias = op.bias()
            module = CODEBOOK_CLASSES[op.kind](op.kind, op.spec, tuple(w.shape), self.bits,
                                               codebook, codes, bias, fits[op.key].zero_code,
                                               self.decode in ("once", "float"),
                                               bias_bits=self.bias_bits,
                                               codebook_bits=self.codebook_bits)
            module.decode = normalize_decode(self.decode)
            first = built.get(op.key)
            if first is not None:  # a tied weight: point at the same stored tensors
                module.codebook, module.codes = first.codebook, first.codes
                if self.codebook_bits:
                    module.codebook_codes, module.codebook_grid = first.codebook_codes, first.codebook_grid
            else:
                built[op.key] = module
                fit = fits[op.key]
                layers[op.name] = {
                    "clusters": int(codebook.numel()), "zero_code": fit.zero_code,
                    "iterations": fit.iterations, "converged": fit.converged,
                    "bytes_before": w.numel() * w.element_size(),
                    "bytes_after": module.weight_bits() // 8,
                    "decode": module.decode, "held_bytes": module.held_bytes()}
            op.replace_with(module)
        n = sum(w.numel() for w in weights.values())
        stored_bits = sum(m.weight_bits() for m in built.values())
        return PassResult(gm, changed=bool(chosen), stats={
            "layers": layers, "weights": n, "bits": self.bits, "scope": self.scope,
            "kmeans_seconds": kmeans_seconds,
            "bits_per_weight": stored_bits / n if n else 0.0})


__all__ = ["Share", "CodebookModule", "CodebookLinear", "CodebookConv", "CodebookEmbedding",
           "CODEBOOK_CLASSES", "HIST_BINS", "KMeans1D", "kmeans_1d"]
