"""Every error fxpress raises derives from :class:`FxpressError`.

Each message names the culprit (the pass, the option, the node, the plugin or the file)
and says what to do about it. Errors raised while a pipeline runs carry ``last_good``:
the last graph that passed verification, still usable.
"""
from __future__ import annotations

from typing import Any


class FxpressError(Exception):
    """Base class of every error fxpress raises."""

    #: The last graph that passed verification, when the error comes from a pipeline run.
    last_good: Any = None


class InputError(FxpressError, TypeError):
    """The caller handed fxpress something it cannot use (not a module, bad inputs)."""


class CaptureError(FxpressError):
    """Neither torch.fx.symbolic_trace nor torch.export could capture the model."""

    def __init__(self, message: str, causes: dict[str, BaseException] | None = None,
                 details: dict[str, str] | None = None):
        super().__init__(message)
        self.causes = dict(causes or {})
        #: what torch printed and warned during each failed attempt (kept off the terminal)
        self.details = dict(details or {})


class PipelineSpecError(FxpressError, ValueError):
    """A pipeline text or TOML recipe is malformed."""

    def __init__(self, message: str, text: str | None = None, position: int | None = None):
        self.text = text
        self.position = position
        if text is not None and position is not None:
            line_start = text.rfind("\n", 0, position) + 1
            line_end = text.find("\n", position)
            line_end = len(text) if line_end < 0 else line_end
            caret = " " * (position - line_start) + "^"
            message = f"{message} (at character {position})\n  {text[line_start:line_end]}\n  {caret}"
        super().__init__(message)


class UnknownPassError(PipelineSpecError, KeyError):
    """A pipeline names a pass that no plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class OptionError(FxpressError, ValueError):
    """A pass option has the wrong name, type or value."""

    def __init__(self, pass_name: str, option: str | None, message: str):
        self.pass_name = pass_name
        self.option = option
        where = f"{pass_name}: option '{option}'" if option else pass_name
        super().__init__(f"{where}: {message}")


class PluginError(FxpressError):
    """A plugin failed to import, or registered something invalid or a taken name."""

    def __init__(self, plugin: str, distribution: str | None, message: str):
        self.plugin = plugin
        self.distribution = distribution
        dist = f" (distribution {distribution})" if distribution else ""
        super().__init__(f"plugin '{plugin}'{dist}: {message}")


class PassError(FxpressError):
    """A pass raised, returned the wrong thing, broke the graph or mutated shared state."""

    def __init__(self, pass_name: str, message: str, last_good: Any = None):
        self.pass_name = pass_name
        self.last_good = last_good
        super().__init__(f"pass '{pass_name}': {message}")


class SharedTensorWriteError(FxpressError, RuntimeError):
    """An in-place write into a tensor shared with the caller's model was refused."""

    def __init__(self, tensor: str, operation: str):
        self.tensor = tensor
        self.operation = operation
        super().__init__(
            f"in-place write ({operation}) into '{tensor}', a tensor shared with the caller's "
            "model, was refused before anything was written; replace the tensor instead "
            "(WeightedOp.set_weight, or assign a new one), or declare "
            "PassTraits(replaces_tensors=False) to work on private copies")


class MissingDataError(PassError):
    """A pass needs calibration or training data that the pipeline was not given."""


class VerificationError(FxpressError):
    """A pass drifted past its tolerance (policy ``strict``)."""

    def __init__(self, pass_name: str, metric: str, limit: float, value: float,
                 message: str | None = None, last_good: Any = None, record: Any = None):
        self.pass_name = pass_name
        self.metric = metric
        self.limit = limit
        self.value = value
        self.last_good = last_good
        self.record = record
        # the record's message names every missed metric, not only the first
        what = getattr(record, "message", "") or f"{metric} = {value:.6g}, limit {limit:.6g}"
        super().__init__(message or (
            f"pass '{pass_name}' failed verification: {what}. "
            f"Loosen it with '{pass_name}{{tol.{metric}=...}}', choose policy 'warn' or "
            f"'rollback', or make the pass less aggressive."))


class ArtifactError(FxpressError):
    """An artifact is malformed, corrupted, tampered with or names a forbidden target."""


class ArtifactFormatError(ArtifactError):
    """Not an fxpress artifact, an unknown format version, truncated, or sizes that do not add up."""


class ArtifactIntegrityError(ArtifactFormatError):
    """A checksum does not match: the file was corrupted or edited after it was written."""


class ArtifactSecurityError(ArtifactFormatError):
    """The artifact asks for something loading never does: a target, attribute, module class or
    value outside the closed schema (private names, callables, raw memory access)."""


class ForbiddenTargetError(ArtifactSecurityError):
    """The artifact names a function, method, attribute or module class outside the allowlist."""


class ArtifactLimitError(ArtifactFormatError):
    """The artifact is over a load limit (header size, node count, nesting, decoded bytes);
    raise the limit per call (``fxpress.load(path, max_bytes=..., limits=...)``) if you trust it."""


class UnsupportedGraphError(ArtifactError):
    """``save`` met something it cannot store as data (a custom module class, a hook, a lambda)."""


class MissingExtraError(FxpressError, ImportError):
    """An optional feature needs packages that are not installed; the message names the
    extra to install (``pip install 'fxpress[onnx]'``)."""

    def __init__(self, feature: str, extra: str, missing: list[str] | tuple[str, ...]):
        self.feature, self.extra, self.missing = feature, extra, list(missing)
        self.install = f"pip install 'fxpress[{extra}]'"
        super().__init__(f"{feature} needs {', '.join(self.missing)}, which "
                         f"{'is' if len(self.missing) == 1 else 'are'} not installed: {self.install}")


class ExportError(FxpressError):
    """A model could not be exported to another runtime (ONNX); the message names the layer,
    the input or the file."""


class CompileError(FxpressError):
    """``fxpress.compile``: torch.compile could not compile the model; the message names
    what torch refused."""


class PlanMissedWarning(UserWarning):
    """``compress(..., target=...)`` returned a model that misses the size target or the
    accuracy budget; ``missed`` says by how much (also ``result.plan.missed``)."""

    def __init__(self, message: str, missed: dict | None = None):
        super().__init__(message)
        self.missed = dict(missed or {})


class GradientWarning(UserWarning):
    """``distill`` trains a graph that differentiates ops the model's own backward replaced:
    a custom ``torch.autograd.Function`` (a straight-through estimator) captured by
    torch.export as its forward's ops; ``functions`` names the classes."""

    def __init__(self, message: str, functions: list[str] | None = None):
        super().__init__(message)
        self.functions = list(functions or [])


__all__ = [
    "FxpressError", "InputError", "CaptureError", "PipelineSpecError", "UnknownPassError",
    "OptionError", "PluginError", "PassError", "SharedTensorWriteError", "MissingDataError", "VerificationError",
    "ArtifactError", "ArtifactFormatError", "ArtifactIntegrityError", "ArtifactSecurityError",
    "ForbiddenTargetError", "ArtifactLimitError", "UnsupportedGraphError", "MissingExtraError",
    "ExportError", "CompileError", "PlanMissedWarning", "GradientWarning",
]
