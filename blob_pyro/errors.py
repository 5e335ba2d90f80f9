"""The errors a user can cause: one base class, one line each.

::

    try:
        train_run(cfg, "runs/x")
    except BlobPyroError as err:       # what the CLI catches: it prints str(err) and exits 2
        print(err)

Every subclass also derives from the built-in type callers would expect (``ValueError`` for a bad
setting or file, ``RuntimeError`` for training that cannot go on), so ``except ValueError`` keeps working.
Messages are one line that names the setting, file or step at fault.
"""

from __future__ import annotations

__all__ = ["BlobPyroError", "ConfigError", "DataError", "ModelError", "TargetModuleError", "HeadError", "RunError",
           "CheckpointError", "TrainingError"]


class BlobPyroError(Exception):
    """Base of every error caused by the user's input (settings, files, data); the message is one line."""


class ConfigError(BlobPyroError, ValueError):
    """A bad or conflicting setting."""


class DataError(BlobPyroError, ValueError):
    """A dataset or data folder is missing or malformed."""


class ModelError(BlobPyroError, ValueError):
    """The backbone cannot be loaded or does not fit the request."""


class TargetModuleError(BlobPyroError, ValueError):
    """The requested LoRA target modules do not exist in the model."""


class HeadError(BlobPyroError, ValueError):
    """A head cannot score the given examples (e.g. an option word that is not one token)."""


class RunError(BlobPyroError, ValueError):
    """A run folder is missing, damaged or does not fit the requested model."""


class CheckpointError(BlobPyroError, ValueError):
    """A checkpoint is damaged or does not fit the run."""


class TrainingError(BlobPyroError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""
