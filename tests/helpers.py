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


# -- crafting bad artifacts (shared by test_artifact.py, test_bad_inputs.py, test_properties.py) --

def tamper(data: bytes, mutate) -> bytes:
    """Edit the header and re-sign it, as a deliberate attacker would (checksums then pass:
    only the allowlist stands between the file and the interpreter)."""
    from fxpress.graph import artifact

    header, payload, _ = artifact._split_prefix(data, "t")
    mutate(header)
    return artifact.pack_artifact(header, bytes(payload))


def node(header, op):
    """The first node of kind ``op`` in an artifact header's graph."""
    return next(n for n in header["graph"]["nodes"] if n["op"] == op)


def set_target(target, args=None):
    """A header mutation that points the first call_function node at ``target``."""
    def mutate(h):
        n = node(h, "call_function")
        n["target"] = target
        if args is not None:
            n["args"] = args
    return mutate


def flip_tensor_byte(data: bytes, tensor: str, stream: str = "values", offset: int = 7,
                     mask: int = 0x40) -> bytes:
    """``data`` with one bit flipped inside the stored bytes of ``tensor``'s ``stream``."""
    import json

    from fxpress.graph import artifact

    header, payload, _ = artifact._split_prefix(data, "t")
    key = header["tensors"][tensor]["streams"][stream]["key"]
    st_len = int.from_bytes(payload[:8], "little")
    st_header = json.loads(bytes(payload[8:8 + st_len]))
    if key in st_header:
        at = st_header[key]["data_offsets"][0]
    else:  # a small stream inside the blob
        at = st_header[artifact.BLOB_KEY]["data_offsets"][0] + next(
            a for t, s, _, a, _ in artifact._blob_streams(header) if (t, s) == (tensor, stream))
    start = len(data) - len(payload) + 8 + st_len + at + offset
    flipped = bytearray(data)
    flipped[start] ^= mask
    return bytes(flipped)
