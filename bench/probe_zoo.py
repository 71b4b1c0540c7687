"""Probe: models fxpress has never seen, through every pass with default options.

Each architecture below is NOT in ``tests/zoo.py`` (neither ``ZOO`` nor ``HELD_OUT``): the
round-16 probe's models (lost with its script, rebuilt here) and families nobody ran. Each
cell is one model through one pipeline with the pass's DEFAULT options, run by the zoo
matrix's own cell (``tests/zoo_matrix.run_cell``: capture, pass, coverage, finite metrics,
outputs on a new input and a new shape, save + load bit-exact here, then one fresh Python
process that imports neither transformers nor this file loads every artifact and must
reproduce the outputs bit for bit).

    python -m bench.probe_zoo                 # every model x every column (~20 min, 2 cores)
    python -m bench.probe_zoo fno gemma2      # some models
    python -m bench.probe_zoo --json out.json # also the cells as JSON

``HELD_OUT`` names the models kept for judging the fixes: they were run only after the
fixes were made, never while making them. ``grucell_loop`` (round 17's class) and
``timm_like`` (round 21's: a dataclass output) moved into ``tests/zoo.py``'s ``ZOO``; the
probe still runs them.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from tests.zoo import VOCAB, SqueezeExcite, Specimen, _bn_stats, _hf, _ids_mask, _ids_only, _image, _randn, _seq2seq, \
    _specimen, _ids, _mask, grucell_loop, timm_like

#: column -> pipeline text: every pass with its default options (prune needs a target;
#: distill runs one epoch at a fixed rate, as in tests/zoo_matrix.py: its default range test
#: and 30-epoch cycles took 80-180 s a cell on the
#: loaded 2-core machine, on models whose uncompressed graph has nothing to recover)
COLUMNS: dict[str, str] = {
    "prune": "prune{sparsity=0.5}",
    "share": "share",
    "quantize8": "quantize",
    "quantize4": "quantize{bits=4}",
    "binarize": "binarize",
    "ternary": "binarize{mode=ternary}",
    "distill": "distill{epochs=1,lr=0.0001}",
}


def _tokens(b, n, s):
    return (_randn(b, n, 16, seed=s),)


# -- round 16's torch models -------------------------------------------------------------------

class MobileNetV3ish(nn.Module):
    """Inverted residuals with hardswish, depthwise convs and squeeze-excite."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48),
                                nn.Hardswish())
        self.se = SqueezeExcite(48)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 5))

    def forward(self, x):
        h = self.stem(x)
        h = h + self.project(self.se(self.dw(self.expand(h))))
        return self.head(h.mean((2, 3)))


def mobilenet_v3() -> Specimen:
    torch.manual_seed(0)
    return _specimen("mobilenet_v3", _bn_stats(MobileNetV3ish()), _image, shape=(2, 16), reshaped=(3, 24))


class DiffusionResBlock(nn.Module):
    """A diffusion UNet's residual block: GroupNorm, SiLU, a time embedding added."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 16, 3, padding=1)
        self.n1, self.c1 = nn.GroupNorm(4, 16), nn.Conv2d(16, 32, 3, padding=1)
        self.temb = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32))
        self.n2, self.c2 = nn.GroupNorm(8, 32), nn.Conv2d(32, 32, 3, padding=1)
        self.skip = nn.Conv2d(16, 32, 1)
        self.out = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x, t):
        half = 8
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = self.temb(torch.cat([torch.sin(args), torch.cos(args)], -1))
        h0 = self.inp(x)
        h = self.c1(F.silu(self.n1(h0))) + emb[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.out(h + self.skip(h0))


def gn_unet_block() -> Specimen:
    torch.manual_seed(0)

    def make(b, n, s):
        return (_randn(b, 3, n, n, seed=s), torch.randint(0, 1000, (b,), generator=torch.Generator().manual_seed(s)))
    return _specimen("gn_unet_block", DiffusionResBlock(), make, shape=(2, 8), reshaped=(3, 12))


class Video3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv3d(3, 8, (3, 3, 3), padding=1), nn.BatchNorm3d(8)
        self.c2 = nn.Conv3d(8, 16, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.b1(self.c1(x)))))
        return self.head(F.adaptive_avg_pool3d(h, 1).flatten(1))


def video3d() -> Specimen:
    torch.manual_seed(0)
    return _specimen("video3d", _bn_stats(Video3d()), lambda b, n, s: (_randn(b, 3, 4, n, n, seed=s),),
                     shape=(2, 8), reshaped=(3, 12))


class SpectralConv1d(nn.Module):
    def __init__(self, c: int, modes: int):
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(torch.randn(c, c, modes, dtype=torch.cfloat) / c)

    def forward(self, x):
        xf = torch.fft.rfft(x)
        out = torch.zeros(x.shape[0], x.shape[1], xf.shape[-1], dtype=torch.cfloat)
        out[:, :, :self.modes] = torch.einsum("bix,iox->box", xf[:, :, :self.modes], self.weight)
        return torch.fft.irfft(out, n=x.shape[-1])


class FNO1d(nn.Module):
    """A Fourier neural operator: spectral convs (complex weights) plus pointwise convs."""

    def __init__(self):
        super().__init__()
        self.lift = nn.Linear(2, 16)
        self.spec = nn.ModuleList([SpectralConv1d(16, 4) for _ in range(2)])
        self.w = nn.ModuleList([nn.Conv1d(16, 16, 1) for _ in range(2)])
        self.proj = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, x):
        h = self.lift(x).permute(0, 2, 1)
        for s, w in zip(self.spec, self.w):
            h = F.gelu(s(h) + w(h))
        return self.proj(h.permute(0, 2, 1))


def fno() -> Specimen:
    torch.manual_seed(0)
    return _specimen("fno", FNO1d(), lambda b, n, s: (_randn(b, n, 2, seed=s),), shape=(2, 16),
                     reshaped=(3, 24))


class SuperRes(nn.Module):
    """ESPCN: convs then PixelShuffle(2)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 5, padding=2), nn.Conv2d(16, 8, 3, padding=1)
        self.c3, self.shuffle = nn.Conv2d(8, 4, 3, padding=1), nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))


def pixel_shuffle() -> Specimen:
    torch.manual_seed(0)
    return _specimen("pixel_shuffle", SuperRes(), lambda b, n, s: (_randn(b, 1, n, n, seed=s),),
                     reshaped=(3, 12))


class BilinearPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(6, 12)
        self.bil, self.act = nn.Bilinear(16, 12, 20), nn.PReLU()
        self.head = nn.Linear(20, 3)

    def forward(self, x, y):
        return self.head(self.act(self.bil(self.a(x), self.b(y))))


def bilinear_prelu() -> Specimen:
    torch.manual_seed(0)
    return _specimen("bilinear_prelu", BilinearPReLU(),
                     lambda b, n, s: (_randn(b, 8, seed=s), _randn(b, 6, seed=s + 7)))


class EinsumMixer(nn.Module):
    """An MLP-mixer whose token and channel mixing are einsums with parameters."""

    def __init__(self, tokens: int = 8, dim: int = 16):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok = nn.Parameter(torch.randn(tokens, tokens) / tokens ** 0.5)
        self.ch1 = nn.Parameter(torch.randn(dim, 32) / dim ** 0.5)
        self.ch2 = nn.Parameter(torch.randn(32, dim) / 32 ** 0.5)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = x + torch.einsum("st,btd->bsd", self.tok, self.norm1(x))
        x = x + torch.einsum("bte,ed->btd", F.gelu(torch.einsum("btd,de->bte", self.norm2(x), self.ch1)),
                             self.ch2)
        return self.head(x.mean(1))


def einsum_mixer() -> Specimen:
    torch.manual_seed(0)
    return _specimen("einsum_mixer", EinsumMixer(), _tokens, shape=(2, 8), reshaped=(3, 8))


class MaxNormEmbedding(nn.Module):
    """nn.Embedding(max_norm=1): the lookup renormalises the rows it reads, in place."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, max_norm=1.0)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def embedding_max_norm() -> Specimen:
    torch.manual_seed(0)
    return _specimen("embedding_max_norm", MaxNormEmbedding(), _ids_only)


# -- new torch models (nobody ran them) --------------------------------------------------------

class DSCNN(nn.Module):
    """A depthwise-separable keyword-spotting CNN over an MFCC map [B, 1, time, 10]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, (5, 3), padding=(2, 1)), nn.BatchNorm2d(16), nn.ReLU())
        blocks = []
        for _ in range(2):
            blocks += [nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                       nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(16, 12)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def kws_dscnn() -> Specimen:
    torch.manual_seed(0)
    return _specimen("kws_dscnn", _bn_stats(DSCNN()), lambda b, n, s: (_randn(b, 1, n, 10, seed=s),),
                     shape=(2, 16), reshaped=(3, 24))


class GatedTCN(nn.Module):
    """WaveNet-style: causal dilated Conv1d by left padding (F.pad), tanh*sigmoid gates,
    residual and skip 1x1 convs."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(1, 16, 1)
        self.filt = nn.ModuleList([nn.Conv1d(16, 32, 2, dilation=2 ** i) for i in range(3)])
        self.res = nn.ModuleList([nn.Conv1d(16, 16, 1) for _ in range(3)])
        self.skip = nn.ModuleList([nn.Conv1d(16, 16, 1) for _ in range(3)])
        self.out = nn.Conv1d(16, 8, 1)

    def forward(self, x):
        h, skips = self.inp(x), 0
        for i, (f, r, s) in enumerate(zip(self.filt, self.res, self.skip)):
            a, g = f(F.pad(h, (2 ** i, 0))).chunk(2, 1)
            z = torch.tanh(a) * torch.sigmoid(g)
            h, skips = h + r(z), skips + s(z)
        return self.out(F.relu(skips))


def wavenet_tcn() -> Specimen:
    torch.manual_seed(0)
    return _specimen("wavenet_tcn", GatedTCN(), lambda b, n, s: (_randn(b, 1, n, seed=s),), shape=(2, 32),
                     reshaped=(3, 48))


class AttentionPooling(nn.Module):
    """Attention pooling written by hand (no nn.MultiheadAttention): a learned query scores
    each position, a masked softmax weighs them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32, padding_idx=0)
        self.key = nn.Linear(32, 32)
        self.query = nn.Parameter(torch.randn(32) / 32 ** 0.5)
        self.head = nn.Linear(32, 3)

    def forward(self, ids, mask):
        h = self.emb(ids)
        scores = (torch.tanh(self.key(h)) @ self.query).masked_fill(mask == 0, -1e9)
        w = torch.softmax(scores, dim=-1)
        return self.head((w.unsqueeze(-1) * h).sum(1))


def attention_pool() -> Specimen:
    torch.manual_seed(0)
    return _specimen("attention_pool", AttentionPooling(), _ids_mask)


class ConvAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(16, 8, 3, 2, 1, output_padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 1, 3, 2, 1, output_padding=1), nn.Sigmoid())

    def forward(self, x):
        return self.dec(self.enc(x))


def conv_autoencoder() -> Specimen:
    torch.manual_seed(0)
    return _specimen("conv_autoencoder", ConvAutoencoder(), lambda b, n, s: (_randn(b, 1, n, n, seed=s),),
                     shape=(2, 8), reshaped=(3, 16))


# -- transformers: round 16's families ---------------------------------------------------------

def gemma2() -> Specimen:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=64, sliding_window=4)
    return _hf("gemma2", Gemma2ForCausalLM(cfg), _ids_mask)


def opt() -> Specimen:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return _hf("opt", OPTForCausalLM(cfg), _ids_mask)


def bloom() -> Specimen:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2)
    # Bloom's second positional argument is past_key_values: the ids alone
    return _hf("bloom", BloomForCausalLM(cfg), _ids_only)


def electra() -> Specimen:
    from transformers import ElectraConfig, ElectraForSequenceClassification

    torch.manual_seed(0)
    cfg = ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return _hf("electra", ElectraForSequenceClassification(cfg), _ids_mask)


def mpnet() -> Specimen:
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    return _hf("mpnet", MPNetModel(cfg), _ids_mask)


def segformer() -> Specimen:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                          hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                          mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=3)
    return _hf("segformer", SegformerForSemanticSegmentation(cfg), _image, shape=(2, 32), reshaped=(3, 48))


def swin() -> Specimen:
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    cfg = SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                     num_heads=[1, 2], window_size=4)
    return _hf("swin", SwinModel(cfg), _image, shape=(2, 32), reshaped=(3, 32))


def mamba() -> Specimen:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                      conv_kernel=4)
    return _hf("mamba", MambaForCausalLM(cfg), _ids_only, shape=(2, 8), reshaped=(3, 8))


def clip_text() -> Specimen:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2)
    return _hf("clip_text", CLIPTextModel(cfg), _ids_mask)


def marian() -> Specimen:
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    cfg = MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                       decoder_start_token_id=0)
    return _hf("marian", MarianMTModel(cfg), _seq2seq)


def fnet() -> Specimen:
    from transformers import FNetConfig, FNetModel

    torch.manual_seed(0)
    cfg = FNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                     max_position_embeddings=64, use_tpu_fourier_optimizations=False)
    return _hf("fnet", FNetModel(cfg), _ids_only)


# -- transformers: families nobody ran ----------------------------------------------------------

def phi3() -> Specimen:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _hf("phi3", Phi3ForCausalLM(cfg), _ids_mask)


def t5_encoder() -> Specimen:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   feed_forward_proj="gated-gelu")
    return _hf("t5_encoder", T5EncoderModel(cfg), _ids_mask)


def gemma3_text() -> Specimen:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           max_position_embeddings=64, sliding_window=4)
    return _hf("gemma3_text", Gemma3ForCausalLM(cfg), _ids_mask)


def starcoder2() -> Specimen:
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    torch.manual_seed(0)
    cfg = Starcoder2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2)
    return _hf("starcoder2", Starcoder2ForCausalLM(cfg), _ids_mask)


def olmo2() -> Specimen:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    cfg = Olmo2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _hf("olmo2", Olmo2ForCausalLM(cfg), _ids_mask)


def modernbert() -> Specimen:
    from transformers import ModernBertConfig, ModernBertModel

    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64, local_attention=4,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return _hf("modernbert", ModernBertModel(cfg), _ids_mask)


def xlm_roberta() -> Specimen:
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return _hf("xlm_roberta", XLMRobertaForSequenceClassification(cfg), _ids_mask)


def squeezebert() -> Specimen:
    from transformers import SqueezeBertConfig, SqueezeBertModel

    torch.manual_seed(0)
    cfg = SqueezeBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, embedding_size=32,
                            q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
                            intermediate_groups=2, output_groups=2)
    return _hf("squeezebert", SqueezeBertModel(cfg), _ids_mask)


def dinov2() -> Specimen:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, mlp_ratio=2)
    return _hf("dinov2", Dinov2Model(cfg), _image, shape=(2, 32), reshaped=(3, 32))


def mobilevit() -> Specimen:
    from transformers import MobileViTConfig, MobileViTForImageClassification

    torch.manual_seed(0)
    cfg = MobileViTConfig(image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
                          neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2,
                          num_labels=3)
    return _hf("mobilevit", MobileViTForImageClassification(cfg), _image, shape=(2, 32), reshaped=(3, 32))


def efficientnet() -> Specimen:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    torch.manual_seed(0)
    cfg = EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1, num_labels=3,
                             hidden_dim=128)
    return _hf("efficientnet", _bn_stats(EfficientNetForImageClassification(cfg)), _image, shape=(2, 32),
               reshaped=(3, 48))


def hubert() -> Specimen:
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    cfg = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                       num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    return _hf("hubert", HubertModel(cfg), lambda b, n, s: (_randn(b, n, seed=s),), shape=(2, 400),
               reshaped=(3, 560))


def pegasus() -> Specimen:
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    torch.manual_seed(0)
    cfg = PegasusConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                        decoder_start_token_id=0)
    return _hf("pegasus", PegasusForConditionalGeneration(cfg), _seq2seq)


# -- round 18: families nobody ran, called as a user calls them -------------------------------

def gemma() -> Specimen:
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=64)
    return _hf("gemma", GemmaForCausalLM(cfg), _ids_mask)


def codegen() -> Specimen:
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(0)
    cfg = CodeGenConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                        n_ctx=64, bos_token_id=1, eos_token_id=2)
    return _hf("codegen", CodeGenForCausalLM(cfg), _ids_only)  # 2nd positional: past_key_values


def gptj() -> Specimen:
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=64,
                     bos_token_id=1, eos_token_id=2)
    return _hf("gptj", GPTJForCausalLM(cfg), _ids_only)  # 2nd positional: past_key_values


def rwkv() -> Specimen:
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    cfg = RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                     intermediate_size=64, context_length=64)
    return _hf("rwkv", RwkvForCausalLM(cfg), _ids_only, shape=(2, 8), reshaped=(3, 8))


def whisper() -> Specimen:
    """The whole Whisper (encoder and decoder) on log-mel features and decoder ids."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_source_positions=16, max_target_positions=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)

    def make(b, n, s):  # input_features, attention_mask (ignored by Whisper), decoder_input_ids
        return (_randn(b, 16, 32, seed=s), torch.ones(b, 32, dtype=torch.long), _ids(b, n, s + 100))
    return _hf("whisper", WhisperForConditionalGeneration(cfg), make, shape=(2, 6), reshaped=(3, 9))


def speech2text() -> Specimen:
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    torch.manual_seed(0)
    cfg = Speech2TextConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_source_positions=64, max_target_positions=32,
                            input_feat_per_channel=16, num_conv_layers=2, conv_channels=32,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)

    def make(b, n, s):  # input_features [B, frames, mel], attention_mask, decoder_input_ids
        return (_randn(b, 4 * n, 16, seed=s), torch.ones(b, 4 * n, dtype=torch.long), _ids(b, n, s + 100))
    return _hf("speech2text", Speech2TextForConditionalGeneration(cfg), make)


def clip() -> Specimen:
    """CLIP's two towers on input_ids, pixel_values and attention_mask."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=1,
                                      eos_token_id=2),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)

    def make(b, n, s):
        return (_ids(b, n, s), _randn(b, 3, 32, 32, seed=s + 50), _mask(b, n))
    return _hf("clip", CLIPModel(cfg), make)


def convnextv2() -> Specimen:
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    torch.manual_seed(0)
    cfg = ConvNextV2Config(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=4)
    return _hf("convnextv2", ConvNextV2ForImageClassification(cfg), _image, shape=(2, 32), reshaped=(3, 48))


def detr() -> Specimen:
    """DETR with a transformers ResNet backbone (no timm), object queries, pixel_values and a
    pixel mask."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            out_features=["stage2"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                     d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5,
                     num_labels=3)

    def make(b, n, s):
        return (_randn(b, 3, n, n, seed=s), torch.ones(b, n, n, dtype=torch.long))
    return _hf("detr", DetrForObjectDetection(cfg), make, shape=(2, 32), reshaped=(3, 48))


class AudioConvNet(nn.Module):
    """Conv1d audio front end: a strided conv with reflect padding, depthwise dilated convs
    (padding='same'), a grouped pointwise conv, a ConvTranspose1d back up."""

    def __init__(self):
        super().__init__()
        self.front = nn.Conv1d(1, 16, 9, stride=2, padding=4, padding_mode="reflect")
        self.dw = nn.ModuleList(nn.Conv1d(16, 16, 3, dilation=d, padding="same", groups=16) for d in (1, 2, 4))
        self.pw = nn.Conv1d(16, 32, 1, groups=4)
        self.up = nn.ConvTranspose1d(32, 8, 4, stride=2, padding=1)
        self.head = nn.Conv1d(8, 2, 1)

    def forward(self, wav):  # [B, samples]
        h = F.gelu(self.front(wav.unsqueeze(1)))
        for conv in self.dw:
            h = h + F.gelu(conv(h))
        return self.head(F.gelu(self.up(F.gelu(self.pw(h)))))


def audio_convnet() -> Specimen:
    torch.manual_seed(0)
    return _specimen("audio_convnet", AudioConvNet(), lambda b, n, s: (_randn(b, 8 * n, seed=s),))


class MaskedMHA(nn.Module):
    """nn.MultiheadAttention with a key padding mask from the attention mask and a causal
    float mask, its averaged attention weights returned too (need_weights' default)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, ids, mask):
        h = self.emb(ids)
        n = ids.shape[1]
        causal = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        out, weights = self.attn(h, h, h, key_padding_mask=mask == 0, attn_mask=causal)
        return self.head(out), weights


def masked_mha() -> Specimen:
    torch.manual_seed(0)
    return _specimen("masked_mha", MaskedMHA(), _ids_mask)


class BiLSTMTagger(nn.Module):
    """A bidirectional two-layer batch_first LSTM over embeddings, its final states used."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.rnn = nn.LSTM(16, 24, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
        self.tag, self.cls = nn.Linear(48, 7), nn.Linear(48, 3)

    def forward(self, ids):
        out, (h, c) = self.rnn(self.emb(ids))
        return self.tag(out), self.cls(torch.cat([h[-2], h[-1]], -1))


def bilstm_tagger() -> Specimen:
    torch.manual_seed(0)
    return _specimen("bilstm_tagger", BiLSTMTagger(), _ids_only)


class SharedWeights(nn.Module):
    """A weight read twice by F.linear, a tied embedding read back as ``h @ E.T``, a buffer,
    in-place ops and a branch on the input's length."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 32))

    def forward(self, ids):
        h = self.emb(ids)
        if ids.shape[1] > 10:  # long inputs: keep the last 10 tokens
            h = h[:, -10:]
        a = F.linear(h, self.w)
        a.mul_(self.scale).relu_()
        h = h + F.linear(a, self.w)
        return h @ self.emb.weight.T


def shared_weights() -> Specimen:
    torch.manual_seed(0)
    return _specimen("shared_weights", SharedWeights(), _ids_only)


# -- round 20: families nobody had run, and outputs and layers users write ----------------------

def stablelm() -> Specimen:
    from transformers import StableLmConfig, StableLmForCausalLM

    torch.manual_seed(0)
    cfg = StableLmConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _hf("stablelm", StableLmForCausalLM(cfg), _ids_mask)


def mpt() -> Specimen:
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    cfg = MptConfig(vocab_size=VOCAB, d_model=32, n_heads=2, n_layers=2, expansion_ratio=2,
                    max_seq_len=64)
    return _hf("mpt", MptForCausalLM(cfg), _ids_only)  # its 2nd argument is the cache


def yolos() -> Specimen:
    from transformers import YolosConfig, YolosForObjectDetection

    torch.manual_seed(0)
    cfg = YolosConfig(image_size=[32, 32], patch_size=8, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, num_detection_tokens=4,
                      num_labels=3)
    return _hf("yolos", YolosForObjectDetection(cfg), _image, shape=(2, 32), reshaped=(3, 32))


def videomae() -> Specimen:
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    cfg = VideoMAEConfig(image_size=16, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         num_labels=4)

    def clip_(b, n, s):
        return (_randn(b, 4, 3, 16, 16, seed=s),)
    return _hf("videomae", VideoMAEForVideoClassification(cfg), clip_, shape=(2, 16),
               reshaped=(3, 16))


def mamba2() -> Specimen:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                       expand=2, head_dim=16, num_heads=4, n_groups=1, conv_kernel=4, chunk_size=8)
    return _hf("mamba2", Mamba2ForCausalLM(cfg), _ids_only, shape=(2, 8), reshaped=(3, 8))


def longformer() -> Specimen:
    from transformers import LongformerConfig, LongformerModel

    torch.manual_seed(0)
    cfg = LongformerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, attention_window=4, max_position_embeddings=80)
    return _hf("longformer", LongformerModel(cfg), _ids_mask, shape=(2, 16), reshaped=(3, 24))


# -- round 21: held-out families and what users hand over ------------------------------------

def perceiver() -> Specimen:
    from transformers import PerceiverConfig, PerceiverForSequenceClassification

    torch.manual_seed(0)
    cfg = PerceiverConfig(num_latents=8, d_latents=32, d_model=32, num_blocks=1,
                          num_self_attends_per_block=2, num_self_attention_heads=2,
                          num_cross_attention_heads=1, vocab_size=VOCAB, max_position_embeddings=64,
                          num_labels=3)
    return _hf("perceiver", PerceiverForSequenceClassification(cfg), _ids_mask, shape=(2, 16),
               reshaped=(3, 24))


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        return self.fc(F.relu(self.bn2(self.c2(h))).mean((2, 3)))


def bn_train() -> Specimen:
    """A CNN handed over in training mode (never ``.eval()``-ed), BatchNorm with running
    statistics: fxpress compresses its eval-mode function and leaves the caller's flags and
    statistics as they were; the matrix compares against the model in eval mode."""
    torch.manual_seed(0)
    spec = _specimen("bn_train", _bn_stats(BNNet()), _image, shape=(4, 16), reshaped=(3, 24))
    spec.model.train()
    return spec


class RoundSTE(torch.autograd.Function):
    """Round in the forward pass, identity gradient (a straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class STENet(nn.Module):
    """A user's custom ``torch.autograd.Function`` between linears (activation rounding)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x):
        h = RoundSTE.apply(torch.tanh(self.fc1(x)))
        return self.fc3(F.gelu(self.fc2(h)))


def autograd_function() -> Specimen:
    torch.manual_seed(0)
    return _specimen("autograd_function", STENet(), _tokens, shape=(2, 6), reshaped=(3, 9))


ROUND21 = (perceiver, bn_train, autograd_function)

# -- round 22: held-out families, and torch layers used with masks and packed sequences ---------

def llama_default() -> Specimen:
    """A Llama from transformers' DEFAULT LlamaConfig() with only its sizes shrunk (rope,
    attention bias, tied embeddings, rms eps: as a user's config gives them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig()
    cfg.update(dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    return _hf("llama_default", LlamaForCausalLM(cfg), _ids_mask)


def mistral_sliding() -> Specimen:
    """Mistral with a sliding window shorter than the inputs (8 and 12 tokens, window 4)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        sliding_window=4)
    return _hf("mistral_sliding", MistralForCausalLM(cfg), _ids_mask)


def convbert() -> Specimen:
    from transformers import ConvBertConfig, ConvBertForSequenceClassification

    torch.manual_seed(0)
    cfg = ConvBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, embedding_size=32, conv_kernel_size=3, head_ratio=2,
                         max_position_embeddings=64, num_labels=3)
    return _hf("convbert", ConvBertForSequenceClassification(cfg), _ids_mask)


def layoutlm() -> Specimen:
    """LayoutLM: token ids, a mask and one bounding box per token (2-D position embeddings)."""
    from transformers import LayoutLMConfig, LayoutLMForTokenClassification

    torch.manual_seed(0)
    cfg = LayoutLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, max_2d_position_embeddings=128,
                         num_labels=5)

    def make(b, n, s):
        xy = torch.randint(0, 60, (b, n, 2), generator=torch.Generator().manual_seed(s))
        box = torch.cat([xy, xy + torch.randint(1, 60, (b, n, 2), generator=torch.Generator().manual_seed(s + 1))], -1)
        return (_ids(b, n, s), box, _mask(b, n))
    return _hf("layoutlm", LayoutLMForTokenClassification(cfg), make)


def beit() -> Specimen:
    """BEiT: relative position bias per layer, layer scale, mean pooling."""
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(0)
    cfg = BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, use_relative_position_bias=True,
                     num_labels=4)
    return _hf("beit", BeitForImageClassification(cfg), _image, shape=(2, 32), reshaped=(3, 32))


def vit_mae() -> Specimen:
    """ViT-MAE's encoder with its default mask_ratio=0.75: random patch shuffling at every
    call (the noise is an input: the graph gets it as the model does)."""
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    cfg = ViTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)

    def make(b, n, s):
        return (_randn(b, 3, n, n, seed=s), torch.rand(b, (n // 8) ** 2, generator=torch.Generator().manual_seed(s)))
    return _hf("vit_mae", ViTMAEModel(cfg), make, shape=(2, 32), reshaped=(3, 32))


def hiera() -> Specimen:
    from transformers import HieraConfig, HieraForImageClassification

    torch.manual_seed(0)
    cfg = HieraConfig(embed_dim=16, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4],
                      patch_padding=[3, 3], depths=[1, 1], num_heads=[1, 2],
                      embed_dim_multiplier=2.0, num_query_pool=1, query_stride=[2, 2],
                      masked_unit_size=[8, 8], masked_unit_attention=[True, False], num_labels=3)
    return _hf("hiera", HieraForImageClassification(cfg), _image, shape=(2, 64), reshaped=(3, 64))


def patchtst() -> Specimen:
    """PatchTST forecasting: patches of a multivariate series, instance normalisation."""
    from transformers import PatchTSTConfig, PatchTSTForPrediction

    torch.manual_seed(0)
    cfg = PatchTSTConfig(num_input_channels=3, context_length=32, patch_length=8, patch_stride=8,
                         prediction_length=8, d_model=32, num_attention_heads=2,
                         num_hidden_layers=2, ffn_dim=64)
    return _hf("patchtst", PatchTSTForPrediction(cfg), lambda b, n, s: (_randn(b, 32, 3, seed=s),),
               shape=(2, 32), reshaped=(3, 32))


def encodec() -> Specimen:
    """EnCodec: a conv encoder, an LSTM, residual vector quantization, a conv decoder."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    cfg = EncodecConfig(hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[4, 2],
                        codebook_size=32, codebook_dim=16, target_bandwidths=[1.5], sampling_rate=800,
                        num_lstm_layers=1)
    return _hf("encodec", EncodecModel(cfg), lambda b, n, s: (_randn(b, 1, n, seed=s),),
               shape=(2, 160), reshaped=(3, 240))


class PackedLSTM(nn.Module):
    """Variable-length sequences through pack_padded_sequence, an LSTM and back."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 24)
        self.rnn = nn.LSTM(24, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.inp(x), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(out)


def packed_lstm() -> Specimen:
    def make(b, n, s):
        return (_randn(b, n, 16, seed=s), torch.tensor([n] + [max(n - 2 - i, 1) for i in range(b - 1)]))
    torch.manual_seed(0)
    return _specimen("packed_lstm", PackedLSTM(), make)


class PaddedEncoder(nn.Module):
    """nn.TransformerEncoder with src_key_padding_mask from an attention mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 3)

    def forward(self, ids, mask):
        h = self.encoder(self.emb(ids), src_key_padding_mask=mask == 0)
        return self.head(h[:, 0])


def padded_encoder() -> Specimen:
    torch.manual_seed(0)
    return _specimen("padded_encoder", PaddedEncoder(), _ids_mask)


ROUND22 = (llama_default, mistral_sliding, convbert, layoutlm, beit, vit_mae, hiera, patchtst, encodec,
           packed_lstm, padded_encoder)


# -- round 23: encoder-decoders run whole, two towers, MoE routing, audio front ends, and the
#    torch layers users write (ConvNeXt blocks, projected LSTMs, seq-first attention, dict inputs)

def siglip() -> Specimen:
    """SigLIP's two towers (text and vision) on input_ids and pixel_values."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=64),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8))

    def make(b, n, s):
        return (_ids(b, n, s), _randn(b, 3, 32, 32, seed=s + 50))
    return _hf("siglip", SiglipModel(cfg), make)


def umt5() -> Specimen:
    """UMT5, the whole encoder-decoder (relative attention bias in every layer) on ids, mask
    and decoder ids."""
    from transformers import UMT5Config, UMT5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                     num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return _hf("umt5", UMT5ForConditionalGeneration(cfg), _seq2seq)


def switch_transformers() -> Specimen:
    """Switch Transformer: an encoder-decoder whose feed-forwards are top-1 routed experts."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, expert_capacity=8,
                                   num_layers=2, num_sparse_encoder_layers=1, num_decoder_layers=2,
                                   num_sparse_decoder_layers=1, num_heads=2, num_experts=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    return _hf("switch_transformers", SwitchTransformersForConditionalGeneration(cfg), _seq2seq)


def moonshine() -> Specimen:
    """Moonshine speech-to-text: raw audio through a conv front end with group norm, rotary
    encoder and decoder, on audio and decoder ids."""
    from transformers import MoonshineConfig, MoonshineForConditionalGeneration

    torch.manual_seed(0)
    cfg = MoonshineConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, encoder_num_hidden_layers=1,
                          decoder_num_hidden_layers=1, encoder_num_attention_heads=2,
                          decoder_num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)

    def make(b, n, s):  # input_values [B, samples], attention_mask, decoder_input_ids
        return (_randn(b, 400 * n, seed=s), torch.ones(b, 400 * n, dtype=torch.long), _ids(b, n, s + 100))
    return _hf("moonshine", MoonshineForConditionalGeneration(cfg), make, shape=(2, 4), reshaped=(3, 6))


def wavlm() -> Specimen:
    """WavLM: group-norm conv feature extractor, gated relative position bias."""
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2, num_buckets=16, max_bucket_distance=32)
    return _hf("wavlm", WavLMModel(cfg), lambda b, n, s: (_randn(b, n, seed=s),), shape=(2, 400),
               reshaped=(3, 560))


def levit() -> Specimen:
    """LeViT: attention biases indexed by buffers (cached per device in eval mode), BatchNorm
    linears, shrinking attention."""
    from transformers import LevitConfig, LevitForImageClassification

    torch.manual_seed(0)
    cfg = LevitConfig(image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
                      key_dim=[8, 8, 8], drop_path_rate=0, mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2],
                      num_labels=3)
    return _hf("levit", _bn_stats(LevitForImageClassification(cfg)), _image, shape=(2, 32), reshaped=(3, 32))


def bit() -> Specimen:
    """BiT: weight-standardized convs (the weight is normalised in forward), group norm."""
    from transformers import BitConfig, BitForImageClassification

    torch.manual_seed(0)
    cfg = BitConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3, num_groups=4,
                    layer_type="preactivation")
    return _hf("bit", BitForImageClassification(cfg), _image, shape=(2, 32), reshaped=(3, 48))


def mobilenet_v2() -> Specimen:
    """transformers' MobileNetV2 with its default TensorFlow padding (computed from the input
    size at every call), ReLU6, depthwise convs."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=3)
    return _hf("mobilenet_v2", _bn_stats(MobileNetV2ForImageClassification(cfg)), _image, shape=(2, 32),
               reshaped=(3, 40))


def deepseek_v3() -> Specimen:
    """DeepSeek-V3: multi-head latent attention (low-rank q/kv), grouped top-k routed experts
    with a shared expert."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                           num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                           n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _hf("deepseek_v3", DeepseekV3ForCausalLM(cfg), _ids_mask)


def granite_moe() -> Specimen:
    """GraniteMoE: scaled embeddings, residuals and logits; experts as one parallel linear."""
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    torch.manual_seed(0)
    cfg = GraniteMoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64, embedding_multiplier=2.0,
                           residual_multiplier=0.5, logits_scaling=4.0, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    return _hf("granite_moe", GraniteMoeForCausalLM(cfg), _ids_mask)


def funnel() -> Specimen:
    """Funnel Transformer: pooled sequence between blocks, relative attention, an upsampling
    decoder back to the full length."""
    from transformers import FunnelConfig, FunnelModel

    torch.manual_seed(0)
    cfg = FunnelConfig(vocab_size=VOCAB, block_sizes=[1, 1], num_decoder_layers=1, d_model=32, n_head=2,
                       d_head=16, d_inner=64)
    return _hf("funnel", FunnelModel(cfg), _ids_mask)


def xlnet() -> Specimen:
    """XLNet: two-stream relative attention with segment and position terms."""
    from transformers import XLNetConfig, XLNetForSequenceClassification

    torch.manual_seed(0)
    cfg = XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_inner=64, num_labels=3)
    return _hf("xlnet", XLNetForSequenceClassification(cfg), _ids_mask)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute, normalise the last dim, permute back."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, inverted MLP, layer scale (a parameter
    multiplied in), residual."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16))
        self.stage1 = ConvNeXtBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16), nn.Conv2d(16, 32, 2, stride=2))
        self.stage2 = ConvNeXtBlock(32)
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 5)

    def forward(self, x):
        h = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(h.mean((2, 3))))


def convnext_block() -> Specimen:
    torch.manual_seed(0)
    return _specimen("convnext_block", ConvNeXtNet(), _image, shape=(2, 32), reshaped=(3, 48))


class ConvZoo(nn.Module):
    """Grouped, dilated, circular-padded, transposed (grouped, output_padding) and 3-D convs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, padding_mode="circular")
        self.g = nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=4)
        self.up = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.c3 = nn.Conv3d(1, 4, (2, 3, 3), padding=(0, 1, 1))
        self.up3 = nn.ConvTranspose3d(4, 4, (1, 2, 2), stride=(1, 2, 2))
        self.c1d = nn.Conv1d(16, 8, 5, padding=2, padding_mode="replicate")
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, x):
        h = F.relu(self.up(F.relu(self.g(F.relu(self.c1(x))))))          # [B, 16, 2H, 2W]
        v = F.relu(self.up3(F.relu(self.c3(h[:, :2].unsqueeze(1)))))     # [B, 4, 1, 4H, 4W]
        s = F.relu(self.c1d(h.flatten(2)))                                 # [B, 8, 4HW]
        return self.head(torch.cat([s.mean(-1), v.mean((2, 3, 4))], -1))


def conv_zoo() -> Specimen:
    torch.manual_seed(0)
    return _specimen("conv_zoo", ConvZoo(), _image, shape=(2, 8), reshaped=(3, 12))


class ProjLSTM(nn.Module):
    """Sequence-first (batch_first=False): a bidirectional two-layer LSTM with proj_size, then
    a ReLU RNN; its final states used."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, bidirectional=True, proj_size=8)
        self.rnn = nn.RNN(16, 12, nonlinearity="relu")
        self.head = nn.Linear(16 + 12, 4)

    def forward(self, ids):  # [T, B]
        out, (h, c) = self.lstm(self.emb(ids))
        r, hr = self.rnn(out)
        return self.head(torch.cat([r, out], -1)), h[-1] + c[-1, :, :8], hr[0]


def lstm_proj() -> Specimen:
    torch.manual_seed(0)
    return _specimen("lstm_proj", ProjLSTM(), lambda b, n, s: (_ids(n, b, s),))


class SeqFirstAttention(nn.Module):
    """nn.MultiheadAttention with batch_first=False: self-attention with a bool key padding
    mask, then cross-attention whose keys and values have other widths (kdim, vdim: separate
    projection weights) with learned bias_k/bias_v."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.self_attn = nn.MultiheadAttention(32, 4)
        self.cross = nn.MultiheadAttention(32, 2, kdim=12, vdim=20, add_bias_kv=True)
        self.head = nn.Linear(32, 5)

    def forward(self, ids, pad, memory_k, memory_v):  # ids [T, B], pad [B, T] bool
        h = self.emb(ids)
        a, _ = self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)
        h = h + a
        c, w = self.cross(h, memory_k, memory_v)
        return self.head(h + c), w


def mha_seq_first() -> Specimen:
    torch.manual_seed(0)

    def make(b, n, s):
        pad = torch.zeros(b, n, dtype=torch.bool)
        pad[-1, n - 2:] = True
        return (_ids(n, b, s), pad, _randn(5, b, 12, seed=s + 1), _randn(5, b, 20, seed=s + 2))
    return _specimen("mha_seq_first", SeqFirstAttention(), make)


class DictInputs(nn.Module):
    """One dict argument: int64 ids, a bool mask, int64 categorical features and float
    features; a dict of a tuple and a tensor back."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.cat = nn.Embedding(10, 8)
        self.dense = nn.Linear(4, 8)
        self.mix = nn.Linear(16 + 16, 32)
        self.out_a, self.out_b = nn.Linear(32, 3), nn.Linear(32, 1)

    def forward(self, batch):
        h = self.emb(batch["ids"])
        m = batch["mask"].unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        side = torch.cat([self.cat(batch["cat"]).sum(1), self.dense(batch["num"])], -1)
        z = F.relu(self.mix(torch.cat([pooled, side], -1)))
        return {"heads": (self.out_a(z), self.out_b(z).squeeze(-1)), "pooled": pooled}


def dict_inputs() -> Specimen:
    torch.manual_seed(0)

    def make(b, n, s):
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[-1, n - 2:] = False
        return ({"ids": _ids(b, n, s), "mask": mask,
                 "cat": torch.randint(0, 10, (b, 3), generator=torch.Generator().manual_seed(s)),
                 "num": _randn(b, 4, seed=s)},)
    return _specimen("dict_inputs", DictInputs(), make)


def orthogonal_rnn() -> Specimen:
    """Parametrizations users add: an orthogonal recurrent matrix on a GRU, weight_norm on a
    conv, spectral_norm on the head."""
    from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = weight_norm(nn.Conv1d(16, 24, 3, padding=1))
            self.gru = orthogonal(nn.GRU(24, 24, batch_first=True), "weight_hh_l0")
            self.head = spectral_norm(nn.Linear(24, 4))

        def forward(self, x):
            h = F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
            out, _ = self.gru(h)
            return self.head(out)

    torch.manual_seed(0)
    return _specimen("orthogonal_rnn", Net(), _tokens)


ROUND23 = (siglip, umt5, switch_transformers, moonshine, wavlm, levit, bit, mobilenet_v2, deepseek_v3,
           granite_moe, funnel, xlnet, convnext_block, conv_zoo, lstm_proj, mha_seq_first, dict_inputs,
           orthogonal_rnn)


ROUND20 = (stablelm, mpt, yolos, videomae, mamba2, longformer, timm_like)

ROUND18 = (gemma, codegen, gptj, rwkv, whisper, speech2text, clip, convnextv2, detr, audio_convnet,
           masked_mha, bilstm_tagger, shared_weights)


PROBE: dict[str, Callable[[], Specimen]] = {f.__name__: f for f in (
    mobilenet_v3, gn_unet_block, video3d, fno, pixel_shuffle, grucell_loop, bilinear_prelu,
    einsum_mixer, embedding_max_norm, kws_dscnn, wavenet_tcn, attention_pool, conv_autoencoder,
    gemma2, opt, bloom, electra, mpnet, segformer, swin, mamba, clip_text, marian, fnet,
    phi3, t5_encoder, gemma3_text, starcoder2, olmo2, modernbert, xlm_roberta, squeezebert, dinov2,
    *ROUND18, *ROUND20, *ROUND21, *ROUND22, *ROUND23)}

#: never run while fixing: judged once the fixes were made
HELD_OUT: dict[str, Callable[[], Specimen]] = {f.__name__: f for f in (
    mobilevit, efficientnet, hubert, pegasus)}


def build(name: str) -> Specimen:
    return {**PROBE, **HELD_OUT}[name]()


def main(argv: list[str]) -> int:
    from tests.zoo_matrix import as_json, counts, markdown, run_matrix

    out_json = None
    if "--json" in argv:
        i = argv.index("--json")
        out_json, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("models:", " ".join(PROBE), "\nheld out:", " ".join(HELD_OUT))
        return 0
    unknown = [n for n in argv if n not in PROBE and n not in HELD_OUT]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; python -m bench.probe_zoo --help lists them",
              file=sys.stderr)
        return 2
    names = argv or list(PROBE) + list(HELD_OUT)
    t0 = time.perf_counter()
    cells = run_matrix(names, list(COLUMNS), passes=COLUMNS, build=build,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    print(markdown([c for c in cells if c.model not in HELD_OUT], passes=COLUMNS))
    held = [c for c in cells if c.model in HELD_OUT]
    if held:
        print("Held out:\n\n" + markdown(held, passes=COLUMNS))
    n = counts(cells)
    print(f"{n['ok']} ok / {n['skip']} skip / {n['fail']} fail, {time.perf_counter() - t0:.0f} s")
    if out_json:
        open(out_json, "w").write(as_json(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
