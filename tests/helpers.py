"""Assertions shared by the tests."""
from __future__ import annotations

import torch


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to check later that nothing changed."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"{k} changed"


def rebuild(module: torch.nn.Module) -> torch.nn.Module:
    """Rebuild a runtime module the way an artifact does: JSON config + state_dict tensors."""
    import json

    config = json.loads(json.dumps(module.config()))
    params = [n for n, _ in module.named_parameters(recurse=False)]
    tensors = {k: v.clone() for k, v in module.state_dict().items()}
    return type(module).from_state(config, tensors, params)
