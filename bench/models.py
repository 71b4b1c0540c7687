"""Models the benchmark cases share: digits (examples/digits.py), MiniLM (examples/minilm.py)
and a GPT-2-small-sized LM from transformers' default GPT2Config (124M parameters,
random init, nothing downloaded)."""
from __future__ import annotations

import torch

import bench.common  # noqa: F401  (sets sys.path and the offline environment)


class LMLogits(torch.nn.Module):
    """A causal LM as a plain tensor-in, logits-out module (no cache), for capture."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def gpt2_config(size: str = "full"):
    """transformers' default GPT2Config (124M) for "full"; a 2-layer miniature otherwise."""
    from transformers import GPT2Config
    from transformers.utils import logging

    logging.set_verbosity_error()
    if size == "full":
        return GPT2Config()
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128,
                      bos_token_id=0, eos_token_id=0)


def gpt2_inputs(size: str = "full", seed: int = 0) -> tuple:
    ids = torch.randint(0, gpt2_config(size).vocab_size, (2, 32),
                        generator=torch.Generator().manual_seed(seed))
    return (ids,)


def gpt2(size: str = "full", seed: int = 0) -> tuple[torch.nn.Module, tuple]:
    """A randomly initialised GPT-2 LM (seeded) and example inputs."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = LMLogits(GPT2LMHeadModel(gpt2_config(size)).train(False)).train(False)
    return model, gpt2_inputs(size, seed)


def random_bert(seed: int = 0, hidden: int = 256, layers: int = 4, vocab: int = 2000,
                heads: int = 4, positions: int = 160, **config) -> torch.nn.Module:
    """A randomly initialised BERT sentence encoder (examples/minilm.py's pooling), seeded;
    ``config``: more BertConfig fields."""
    from transformers import BertConfig, BertModel

    from examples.minilm import SentenceEncoder

    torch.manual_seed(seed)
    bert = BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=4 * hidden, vocab_size=vocab,
                                max_position_embeddings=positions, **config))
    return SentenceEncoder(bert.train(False)).train(False)


def minilm(size: str = "full"):
    """The pretrained MiniLM sentence encoder and its calibration batches (batch 32).

    ``tiny`` (the smoke test: code paths only) gives a random 2-layer BERT, 32 wide, with
    MiniLM's vocabulary instead, on 8 tokenised sentences: the same BertModel code, captured
    by torch.export like MiniLM, in a fraction of the time."""
    from examples.minilm import SENTENCES, batches, sentence_encoder, tokenizer

    n = {"full": len(SENTENCES), "quick": 64, "tiny": 8}[size]
    data = batches(32 if size != "tiny" else 8, SENTENCES[:n])
    if size == "tiny":
        return random_bert(hidden=32, layers=2, vocab=tokenizer().vocab_size, heads=2), data
    return sentence_encoder(), data


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in
               {id(p): p for p in model.parameters()}.values())
