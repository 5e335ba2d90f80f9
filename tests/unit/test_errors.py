"""blob_pyro.errors: one base class the CLI catches, each error also the built-in type callers expect."""

import pytest

from blob_pyro import errors
from blob_pyro.errors import (
    BlobPyroError,
    CheckpointError,
    ConfigError,
    DataError,
    HeadError,
    ModelError,
    RunError,
    TargetModuleError,
    TrainingError,
)


@pytest.mark.parametrize("cls, builtin", [
    (ConfigError, ValueError), (DataError, ValueError), (ModelError, ValueError), (TargetModuleError, ValueError),
    (HeadError, ValueError), (RunError, ValueError), (CheckpointError, ValueError), (TrainingError, RuntimeError),
])
def test_every_error_is_a_blob_pyro_error_and_a_builtin(cls, builtin):
    assert issubclass(cls, BlobPyroError) and issubclass(cls, builtin)
    with pytest.raises(builtin, match="one line"):
        raise cls("one line")


def test_the_public_names_are_the_errors():
    assert sorted(errors.__all__) == sorted(["BlobPyroError", "ConfigError", "DataError", "ModelError",
                                             "TargetModuleError", "HeadError", "RunError", "CheckpointError",
                                             "TrainingError"])


def test_modules_reexport_the_same_classes():
    from blob_pyro import backbone, checkpoint, config, data, heads, lora

    assert config.ConfigError is ConfigError and backbone.ModelError is ModelError
    assert heads.HeadError is HeadError and lora.TargetModuleError is TargetModuleError
    assert checkpoint.CheckpointError is CheckpointError
    assert issubclass(data.DataError, DataError)  # data's own subclass keeps messages on one line
    assert "\n" not in str(data.DataError("a\nb"))
