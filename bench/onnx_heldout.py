"""ONNX export on held-out encoders: tiny random transformers configs that the ONNX bench
and tests do not use (other widths and head counts, DistilBERT, RoBERTa, GPT-2's causal
attention), each compressed by ``quantize{bits=8}`` and by the bench's 4-bit pipeline,
exported at one batch size and length, then run by ONNX Runtime at another and compared
with fxpress's own run of the same compressed graph (the export check's metrics; the check
batch is padded, so the export's default ``skip_padding`` is checked where it applies)::

    python -m bench.onnx_heldout [SEED ...]     # default: seeds 0 and 1
"""
from __future__ import annotations

import sys
import time

import torch

from bench.case_onnx import INT4, INT8, _random_inputs
from bench.common import Table


def _encoder(kind: str, seed: int):
    import transformers as tf

    from examples.minilm import SentenceEncoder

    torch.manual_seed(seed)
    if kind == "BERT hidden 96, 3 heads":
        model = tf.BertModel(tf.BertConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                                           intermediate_size=384, vocab_size=1000, max_position_embeddings=128))
    elif kind == "DistilBERT dim 128, 4 heads":
        model = tf.DistilBertModel(tf.DistilBertConfig(dim=128, n_layers=2, n_heads=4, hidden_dim=512,
                                                       vocab_size=1000, max_position_embeddings=128))
    elif kind == "RoBERTa hidden 64, 2 heads":
        model = tf.RobertaModel(tf.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=256, vocab_size=1000,
                                                 max_position_embeddings=130))
    else:  # GPT-2: causal attention, Conv1D projections
        model = tf.GPT2Model(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128))
    return SentenceEncoder(model.train(False)).train(False)


KINDS = ("BERT hidden 96, 3 heads", "DistilBERT dim 128, 4 heads", "RoBERTa hidden 64, 2 heads",
         "GPT-2 n_embd 64, 4 heads (causal)")


def main(seeds=(0, 1)) -> Table:
    import fxpress
    from fxpress.onnx_export import _check, _outputs, export_onnx, session

    torch.set_num_threads(2)
    table = Table("held-out encoders: ONNX Runtime vs fxpress's own run of the same compressed "
                  "graph, exported at batch 4 x 24 tokens, checked at batch 3 x 40",
                  ["model", "seed", "pipeline", "attention", "pad tokens", "rel_l2", "cosine min", "max_abs", "s"])
    for kind in KINDS:
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            enc = _encoder(kind, seed)
            calib = [_random_inputs(16, 32, 1000, gen, (8, 32)) for _ in range(2)]
            export_at = _random_inputs(4, 24, 1000, gen, (6, 24))
            check_at = _random_inputs(3, 40, 1000, gen, (5, 40))
            captured = fxpress.capture(enc, calib[0])
            for pipe in (INT8, INT4):
                t0 = time.perf_counter()
                res = fxpress.compress(captured, pipe, calibration=calib, policy="warn")
                out = export_onnx(res, None, export_at)
                sess = session(out.model)
                m = _check(sess, [i.name for i in sess.get_inputs()], check_at, _outputs(res.module, check_at))
                forms = list(out.layers.values())
                att = (f"{sum('QAttention' in f for f in forms) // 3} QAttention"
                       if any("QAttention" in f for f in forms) else
                       f"{sum(n.op_type == 'MultiHeadAttention' for n in out.model.graph.node)} MultiHeadAttention")
                table.add(kind, seed, pipe, att, f"skipped ({out.padding})" if out.padding else "kept",
                          f"{m['rel_l2']:.1e}", f"{m['cosine_min']:.6f}",
                          f"{m['max_abs']:.1e}", f"{time.perf_counter() - t0:.0f}")
                print("|", " | ".join(map(str, table.rows[-1])), "|", flush=True)
    return table


if __name__ == "__main__":
    print(main(tuple(int(s) for s in sys.argv[1:]) or (0, 1)).markdown())
