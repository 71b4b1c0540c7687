"""Bit flips in whole artifacts of real compressed models: each flipped file is refused
with a typed error, or loads and runs to an output of the original shape, within seconds.

Three kinds of flip: anywhere in the file as it is (the prefix, the compressed header,
the payload: damage, which the checksums refuse); in the payload, re-signed (an attacker
edits the bytes and writes the payload's sha256 again); in the header's JSON text,
re-signed. A loaded file's call may still be refused (a typed error naming the module,
``graph/artifact/calls.py``). Its output must be finite unless the flip changed a float
value the file may hold freely (a weight, a bias, a scale, a centroid: a model's own
numbers, which may be as large as float32 holds), not a smoothing factor, which divides
the weight and is at least SMOOTH_MIN as the pass writes it. Found so far: a smoothing
factor's flipped exponent bit (1e-38) loaded and made every output inf; inf/NaN scales,
smoothing factors and centroids loaded too
(test_runtime_state.py::test_non_finite_scales_smoothing_and_centroids_are_refused_at_load).
"""
from __future__ import annotations

import hashlib
import json
import signal
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpress
from fxpress.errors import FxpressError
from fxpress.graph import artifact
from fxpress.graph.artifact import format as fmt
from tests.test_runtime_state import _model

CASES = [
    ("mlp", "quantize{bits=4,granularity=group,group_size=8,activations=none}"),
    ("mlp", "quantize{bits=4,smooth=0.5}"),
    ("mlp", "prune{sparsity=0.9},share{bits=4,bias_bits=8},small"),
    ("mlp", "binarize{mode=pow2,keep_first_last=false}"),
    ("cnn", "share"),
    ("emb", "quantize{bits=4,granularity=group,group_size=8},small"),
    ("emb", "prune{sparsity=0.8,ops=[linear,embedding]}"),
    ("rnn", "quantize{bits=4}"),
]
#: float tensors the loader bounds (a smoothing factor divides the weight)
CHECKED = ("smooth",)


@pytest.fixture(scope="module")
def files():
    out = []
    for name, pipe in CASES:
        model, x = _model(name)
        gm = fxpress.compress(model, pipe, (x,), progress=False, policy="warn").module
        with torch.no_grad():
            shape = tuple(gm(x).shape)
        for entropy in (False, True):
            out.append((f"{name}:{pipe}:entropy={entropy}", artifact.dumps(gm, entropy=entropy),
                        x, shape))
    return out


def _stream_at(header: dict, payload: bytes, at: int) -> tuple[str, str] | None:
    """(tensor, stream) whose stored bytes hold payload byte ``at``, or None."""
    n = int.from_bytes(payload[:8], "little")
    index = json.loads(payload[8:8 + n])
    at -= 8 + n
    for key, rec in index.items():
        if key == "__metadata__":
            continue
        a, b = rec["data_offsets"]
        if not a <= at < b:
            continue
        if key == artifact.BLOB_KEY:
            return next(((t, s) for t, s, _, x, y in artifact._blob_streams(header)
                         if x <= at - a < y), None)
        return next(((t, s) for t, e in header["tensors"].items()
                     for s, info in e.get("streams", {}).items() if info.get("key") == key), None)
    return None


def _free_float(header: dict, where: tuple[str, str] | None) -> bool:
    """Is the flipped stream a float value the file may set to anything?"""
    if where is None:
        return False
    tensor, stream = where
    entry = header["tensors"][tensor]
    return (stream in ("data", "values") and entry.get("dtype", "").startswith(("float", "bfloat"))
            and not tensor.rsplit(".", 1)[-1].startswith(CHECKED))


def _flip(data: bytes, mode: str, frac: float, bit: int) -> tuple[bytes, bool]:
    """The flipped file, and whether a non-finite output is the file's right."""
    if mode == "raw":
        b = bytearray(data)
        b[int(frac * len(b))] ^= 1 << bit
        return bytes(b), False
    header, payload, _ = artifact._split_prefix(data, "t")
    if mode == "payload":
        p = bytearray(payload)
        at = int(frac * len(p))
        p[at] ^= 1 << bit
        free = _free_float(header, _stream_at(header, bytes(payload), at))
        header["payload"]["sha256"] = fmt._sha(bytes(p))
        return artifact.pack_artifact(header, bytes(p)), free
    text = bytearray(json.dumps(fmt.minimize(header), separators=(",", ":")).encode())
    text[int(frac * len(text))] ^= 1 << bit
    z = zlib.compressobj(9, zdict=fmt.HEADER_ZDICT_V3)
    head = z.compress(bytes(text)) + z.flush()
    flags = 1 | 2 | 16 | (4 if "blob" in header else 0)
    prefix = fmt._PREFIX.pack(fmt.MAGIC, fmt.VERSION, flags, len(head),
                              hashlib.sha256(head).digest())
    return prefix + head + bytes(payload), False


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=st.integers(0, 2 * len(CASES) - 1), mode=st.sampled_from(["raw", "payload", "header"]),
       frac=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_is_refused_typed_or_runs(files, case, mode, frac, bit):
    label, data, x, shape = files[case]
    bad, free = _flip(data, mode, frac, bit)
    what = f"{label}: {mode} flip at {frac:.4f} bit {bit}"
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        try:
            gm = artifact.loads(bad, fxpress.registry().runtime_modules())
            with torch.no_grad():
                y = gm(x)
        except FxpressError:
            return
    except _Timeout:
        pytest.fail(f"{what}: load or first call took over 20 s")
    except Exception as e:  # what the test is about
        pytest.fail(f"{what}: raised {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == shape, what
    assert free or bool(torch.isfinite(y.float()).all()), f"{what}: non-finite output"
