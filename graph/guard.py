"""Read-only views of the caller's tensors: nothing a pass does reaches the caller's model.

A pipeline's graphs share the caller's weights instead of copying them (on a large model a
second copy is the difference between fitting and not). :func:`guard` wraps every such
parameter, buffer and tensor attribute in a read-only view over the same storage
(:class:`ReadOnlyParameter` for parameters, :class:`ReadOnlyTensor` otherwise):

* an in-place operation on it (``w.mul_(2)``, ``w[0] = 1``, ``w += 1``, ``torch.add(a, b,
  out=w)``, ``F.relu(w, inplace=True)``, the same through ``w.data``, ``w.detach()``, a view,
  or inside ``torch.no_grad()``) raises :class:`~fxpress.errors.SharedTensorWriteError`
  before anything is written;
* ``w.numpy()`` (and ``np.asarray(w)``) is a read-only array;
* every other operation returns an ordinary tensor, or a read-only view when its result
  shares the guarded storage (``w.t()``, ``w.view(-1)``, ``w.data``);
* ``copy.deepcopy`` gives an ordinary, writable copy (a pass that asked for its own copies
  owns them).

:class:`CallerModel` bundles what a pipeline needs to leave the caller's model as it was:
a structural copy to trace, verify against and distil from (train/eval flags are set on
the copy, never on the caller's modules), the views, and checksums (crc32 of each storage,
read a block at a time, never copied whole) that catch what bypasses the views (raw
pointers, ctypes). :func:`preserved_rng` restores the process's random state and the
settings a model's forward may change (default dtype, thread count, grad mode).
"""
from __future__ import annotations

import contextlib
import random
import sys
import threading
import zlib
from typing import Any, Iterable, Iterator

import torch
from torch.utils import _pytree as pytree

from fxpress.errors import SharedTensorWriteError
from fxpress.graph.capture import clone_structure

_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                    "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                    "__ilshift__", "__irshift__", "__imatmul__"}
# in-place by name but touching only the wrapper's own metadata, not the shared storage
_METADATA_ONLY = {"requires_grad_", "retain_grad", "detach_", "set_", "share_memory_"}
_NUMPY = {"numpy", "__array__"}
_BLOCK = 1 << 24  # bytes hashed per call


def _name(func: Any) -> str:
    if isinstance(func, torch._ops.OpOverload):
        return func.overloadpacket.__name__
    return getattr(func, "__name__", "")


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors ``func`` writes into, as far as the call shows it."""
    out: list[torch.Tensor] = []
    name = _name(func)
    if name in _METADATA_ONLY:  # aten.detach_ too, whose schema marks self as written
        return out
    if isinstance(func, torch._ops.OpOverload):
        schema_args = func._schema.arguments
        for i, a in enumerate(schema_args):
            if a.alias_info is not None and a.alias_info.is_write:
                v = args[i] if i < len(args) else kwargs.get(a.name)
                out += [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
        return out
    if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")):
        first = args[0] if args else None
        out += [t for t in pytree.tree_leaves(first) if isinstance(t, torch.Tensor)]
    if name == "batch_norm":  # training mode updates the running statistics in place
        stats = args[3:5] if func is torch.batch_norm else args[1:3]
        if kwargs.get("training", args[5] if len(args) > 5 else False):
            out += [t for t in (*stats, kwargs.get("running_mean"), kwargs.get("running_var"))
                    if isinstance(t, torch.Tensor)]
    if kwargs.get("inplace") is True and args:
        out += [t for t in pytree.tree_leaves(args[0]) if isinstance(t, torch.Tensor)]
    if kwargs.get("out") is not None:
        out += [t for t in pytree.tree_leaves(kwargs["out"]) if isinstance(t, torch.Tensor)]
    return out


def _storage_key(t: torch.Tensor) -> int | None:
    with torch._C.DisableTorchFunctionSubclass():
        if t.device.type == "meta":
            return None
        return t.untyped_storage().data_ptr()


class _ReadOnly:
    """The behaviour shared by :class:`ReadOnlyTensor` and :class:`ReadOnlyParameter`."""

    #: qualified name of the guarded tensor (for the error message)
    _fxpress_name: str = "?"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bad = [t for t in _written(func, args, kwargs) if isinstance(t, _ReadOnly)]
        if bad:
            raise SharedTensorWriteError(bad[0]._fxpress_name, _name(func))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            if _name(func) in _NUMPY:
                if hasattr(out, "flags"):
                    out.flags.writeable = False
                return out
            guarded = {}
            for a in pytree.tree_leaves((args, kwargs)):
                if isinstance(a, _ReadOnly):
                    key = _storage_key(a)
                    if key is not None:
                        guarded[key] = a._fxpress_name
            if not guarded:
                return out
            return pytree.tree_map_only(torch.Tensor, lambda t: _protect_alias(t, guarded), out)

    def __deepcopy__(self, memo):
        with torch._C.DisableTorchFunctionSubclass():
            data = torch.Tensor.clone(self).detach()
        copy = (torch.nn.Parameter(data, requires_grad=self.requires_grad)
                if isinstance(self, torch.nn.Parameter) else data)
        memo[id(self)] = copy
        return copy

    def __reduce_ex__(self, protocol):  # never pickled as a read-only view
        raise TypeError("a read-only view of a caller's tensor cannot be pickled")


def _protect_alias(t: torch.Tensor, guarded: dict[int, str]) -> torch.Tensor:
    if isinstance(t, _ReadOnly) or t.device.type == "meta":
        return t
    key = _storage_key(t)
    if key in guarded:
        return _read_only(t, guarded[key], parameter=False)
    return t


class ReadOnlyTensor(_ReadOnly, torch.Tensor):
    """A read-only view of a caller's buffer or tensor attribute (see the module docs)."""


class ReadOnlyParameter(_ReadOnly, torch.nn.Parameter):
    """A read-only view of a caller's parameter (see the module docs)."""

    def __repr__(self) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            return f"ReadOnlyParameter({torch.Tensor.__repr__(self)})"


def _read_only(t: torch.Tensor, name: str, parameter: bool | None = None) -> torch.Tensor:
    """A read-only view of ``t``'s bytes: a new tensor object over the same storage (not an
    autograd view, so no ``_base`` chain leads back to a writable tensor)."""
    if parameter is None:
        parameter = isinstance(t, torch.nn.Parameter)
    cls = ReadOnlyParameter if parameter else ReadOnlyTensor
    with torch._C.DisableTorchFunctionSubclass():
        view = torch.Tensor._make_subclass(cls, t.detach(), bool(parameter and t.requires_grad))
    view._fxpress_name = name
    return view


def _slots(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, dict, str]]:
    """(qualified name, owner, the dict holding it, key) of every tensor in ``module``."""
    for prefix, m in module.named_modules(remove_duplicate=True):
        for store in (m._parameters, m._buffers):
            for k, t in list(store.items()):
                if isinstance(t, torch.Tensor):
                    yield (f"{prefix}.{k}" if prefix else k), m, store, k
        for k, t in list(vars(m).items()):
            if isinstance(t, torch.Tensor) and not k.startswith("__"):
                yield (f"{prefix}.{k}" if prefix else k), m, vars(m), k


class Guard:
    """Wraps the tensors of modules in read-only views, one view per tensor (tied weights
    stay tied), and remembers the originals for :meth:`release`."""

    def __init__(self) -> None:
        self._views: dict[int, torch.Tensor] = {}      # id(original) -> view
        self._originals: dict[int, torch.Tensor] = {}  # id(view) -> original

    def protect(self, *modules: torch.nn.Module) -> None:
        for module in modules:
            for name, _, store, key in _slots(module):
                t = store[key]
                if id(t) in self._originals or t.device.type == "meta":
                    continue
                view = self._views.get(id(t))
                if view is None:
                    view = self._views[id(t)] = _read_only(t, name)
                    self._originals[id(view)] = t
                store[key] = view

    def release(self, *modules: torch.nn.Module | None) -> None:
        """Put the original tensor objects back wherever a view is held (a view a pass
        derived and stored, ``w.t()``, becomes an ordinary tensor over the same bytes)."""
        for module in modules:
            if module is None:
                continue
            for _, _, store, key in _slots(module):
                t = store[key]
                if isinstance(t, _ReadOnly):
                    original = self._originals.get(id(t))
                    if original is None:
                        with torch._C.DisableTorchFunctionSubclass():
                            original = t.as_subclass(torch.Tensor)
                    store[key] = original


def storage_checksums(named: Iterable[tuple[str, torch.Tensor]]) -> dict[int, tuple[str, int]]:
    """crc32 of each distinct storage behind the named tensors, keyed by its address (the
    first name that uses it names it). Read a block of 16 MiB at a time through a byte
    view of the storage: nothing is copied (bar a block at a time off a device)."""
    sums: dict[int, tuple[str, int]] = {}
    with torch._C.DisableTorchFunctionSubclass():
        for name, t in named:
            key = _storage_key(t)
            if key is None or key in sums:
                continue
            raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
            crc = 0
            for start in range(0, raw.numel(), _BLOCK):
                block = raw[start:start + _BLOCK]
                if block.device.type != "cpu":
                    block = block.cpu()
                crc = zlib.crc32(memoryview(block.numpy()), crc)
            sums[key] = (name, crc)
    return sums


def named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` with its name (tied ones under each name)."""
    return list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False))


class CallerModel:
    """The caller's model as a pipeline may use it.

    ``reference`` is a structural copy (its own module objects, the caller's tensors), so
    switching it to eval mode, tracing or tapping it never touches the caller's modules,
    even with several pipelines running on the same model in threads. :meth:`protect`
    puts read-only views over the caller's tensors into the pipeline's modules;
    :meth:`changed` names the caller's tensors whose bytes changed since the start
    (checksums), what no view can stop (a raw pointer, ctypes); :meth:`release` puts the
    caller's own tensor objects back into the graphs the pipeline hands out.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._sums = storage_checksums(named_tensors(model))
        self.guard = Guard()
        try:
            self.reference = clone_structure(model)
        except Exception:  # a module tree that cannot be copied: use it, flags restored after
            self.reference = model
        if self.reference is not model:
            self.guard.protect(self.reference)

    def protect(self, module: torch.nn.Module) -> None:
        self.guard.protect(module)

    def release(self, *modules: torch.nn.Module | None) -> None:
        self.guard.release(*modules)

    def changed(self) -> list[str]:
        """Names of the caller's tensors whose bytes differ from the start of the run."""
        now = storage_checksums(named_tensors(self.model))
        return [name for key, (name, crc) in self._sums.items()
                if now.get(key, (name, crc))[1] != crc]


def shared_write(e: BaseException | None) -> SharedTensorWriteError | None:
    """The refused write behind ``e``, if one is in its chain of causes."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SharedTensorWriteError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def forward_write_error(e: BaseException, model: Any) -> str | None:
    """What to tell the caller when running their model was refused because its forward
    writes in place into its own tensors (a step counter, a cache, statistics it updates):
    the guard's message speaks to pass writers. None for any other error."""
    if not isinstance(e, SharedTensorWriteError):
        return None
    return (f"{type(model).__name__}'s forward writes in place into its own tensor "
            f"'{e.tensor}' ({e.operation}); fxpress runs the model without changing it, so a "
            "forward that updates its state (a step counter, a cache, statistics) cannot run "
            "here: move the update out of forward, or under `if self.training:`")


_RNG_LOCK = threading.Lock()
_RNG_DEPTH = 0
_RNG_SAVED: Any = None


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None
    return (torch.get_rng_state(), cuda, random.getstate(), _numpy_state(),
            torch.get_default_dtype(), torch.get_num_threads(), _flags())


def _numpy_state() -> Any:
    np = sys.modules.get("numpy")
    return np.random.get_state() if np is not None else None


#: torch's process-wide switches a forward can flip (their getters, their setters)
_FLAGS: tuple[tuple[Any, Any], ...] = (
    (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    (lambda: (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled()),
     lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
    (lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
     lambda v: torch.set_anomaly_enabled(*v)),
    (lambda: torch.get_default_device().type, lambda v: torch.set_default_device(
        None if v == "cpu" else v)),
    (lambda: torch.backends.mkldnn.enabled, lambda v: setattr(torch.backends.mkldnn, "enabled", v)),
    (lambda: (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic),
     lambda v: [setattr(torch.backends.cudnn, k, x)
                for k, x in zip(("enabled", "benchmark", "deterministic"), v)]),
    (lambda: sys.modules["numpy"].geterr() if "numpy" in sys.modules else None,
     lambda v: v is not None and sys.modules["numpy"].seterr(**v)),
)


def _flags() -> list[Any]:
    return [get() for get, _ in _FLAGS]


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, py, np_state, dtype, threads, flags = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    if np_state is not None:
        sys.modules["numpy"].random.set_state(np_state)
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    for (get, put), saved in zip(_FLAGS, flags):
        if get() != saved:
            put(saved)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the process's random state (torch CPU and CUDA, Python's ``random``,
    NumPy's global generator), torch's default dtype, device and thread count, its global
    switches (float32 matmul precision, deterministic algorithms, anomaly detection, the
    oneDNN and cuDNN flags, NumPy's floating-point error handling) and this thread's grad
    mode when the block ends, however it ends: a model's forward that calls
    ``torch.manual_seed``, ``set_default_dtype``, ``set_num_threads``,
    ``set_float32_matmul_precision`` or ``set_grad_enabled`` while fxpress traces or runs
    it changes nothing of the caller's.
    Nested and concurrent blocks (pipelines in threads) share one saved state: the first to
    enter saves it, the last to leave restores it (grad mode is per thread: each block
    restores its own)."""
    global _RNG_DEPTH, _RNG_SAVED
    grad = torch.is_grad_enabled()
    with _RNG_LOCK:
        if _RNG_DEPTH == 0:
            _RNG_SAVED = _rng_state()
        _RNG_DEPTH += 1
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        with _RNG_LOCK:
            _RNG_DEPTH -= 1
            if _RNG_DEPTH == 0:
                _set_rng_state(_RNG_SAVED)
                _RNG_SAVED = None


__all__ = ["Guard", "CallerModel", "forward_write_error", "shared_write", "ReadOnlyTensor", "ReadOnlyParameter", "storage_checksums",
           "named_tensors", "preserved_rng"]
