"""Typed exceptions. The library raises these; only the CLI (`noop_rt/cli/main.py`) maps them to exit codes and
one-line messages."""

from __future__ import annotations


class NoopError(Exception):
    """Base class of every error noop-rt reports to a user. `exit_code` follows the CLI contract."""

    exit_code: int = 1


class BadInputError(NoopError):
    """A missing or corrupt image, folder, class list or option value."""


class BackboneError(BadInputError):
    """The model folder is not a usable diffusers Stable Diffusion (or demo) checkpoint."""


class CheckpointError(BadInputError):
    """A NoOp checkpoint that is missing, truncated, of another format or of another backbone."""


class BundleError(BadInputError):
    """An exported bundle that is incomplete, tampered with or of another format version."""


class EngineError(BadInputError):
    """A TensorRT engine that cannot be built or loaded here (missing TensorRT/GPU, stale plan)."""


class NonFiniteError(BadInputError):
    """A graph produced NaN or infinite values (typically fp16 overflow)."""


class MissingDependencyError(BadInputError):
    """An optional package (tensorrt, ray, onnxruntime-gpu...) is needed but not installed."""


class ValidationFailedError(NoopError):
    """A parity or precision check after export/build failed."""

    exit_code = 3


class ReportedInterrupt(KeyboardInterrupt):
    """Ctrl-C that a job has already reported (what it kept, how to resume): the CLI exits 130 without a word more."""


class UsageError(NoopError):
    """An unknown option value (backend, method, loss...): exit 2 like any other usage error."""

    exit_code = 2
