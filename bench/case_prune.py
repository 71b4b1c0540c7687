"""Magnitude pruning: fxpress prune vs torch.nn.utils.prune, time to apply and accuracy."""
from __future__ import annotations

import copy

import torch

from bench.common import Table, median_time

TITLE = "Pruning: fxpress vs torch.nn.utils.prune"


def run(size: str) -> list[Table]:
    import torch.nn.utils.prune as tprune

    import fxpress
    from examples.digits import accuracy, calibration, digits_data, trained_mlp

    data = digits_data()
    hidden = (16,) if size == "tiny" else (300, 100)
    model = trained_mlp(hidden=hidden, epochs=5 if size == "tiny" else 40)
    calib = calibration()
    t = Table("digits MLP, global magnitude pruning", [
        "sparsity", "fp32 acc", "fxpress acc", "torch acc", "fxpress apply s (median)",
        "torch apply s (median)", "torch / fxpress time", "state_dict bytes fxpress",
        "state_dict bytes torch"])
    for s in ((0.5,) if size == "tiny" else (0.5, 0.8, 0.9)):
        text = f"prune{{sparsity={s},scope=global}}"
        pipe = fxpress.Pipeline.parse(text, policy="warn", progress=False)
        res = pipe.run(model, calibration=calib)

        def torch_prune():
            m = copy.deepcopy(model)
            params = [(mod, "weight") for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
            tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=s)
            return m

        tm = torch_prune()
        ours_s = median_time(lambda: fxpress.Pipeline.parse(text, policy="warn",
                                                            progress=False).passes[0].run(
            fxpress.graph.clone_structure(res.module), None), repeat=5)
        torch_s = median_time(torch_prune, repeat=5)
        t.add(s, accuracy(model, data.x_test, data.y_test),
              accuracy(res.module, data.x_test, data.y_test), accuracy(tm, data.x_test, data.y_test),
              ours_s, torch_s, torch_s / ours_s, fxpress.graph.stored_bytes(res.module),
              sum(v.numel() * v.element_size() for v in tm.state_dict().values()))
    t.notes.append("torch.nn.utils.prune keeps weight_orig and weight_mask: its state_dict grows; "
                   "fxpress leaves zeros in place (the artifact stores them sparse).")
    return [t]
