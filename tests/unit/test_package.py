"""blob_pyro/__init__.py: the public names load on first use, and importing the package stays light."""

import subprocess
import sys

import pytest

import blob_pyro


def test_every_public_name_is_the_modules_object():
    from importlib import import_module

    for name, module in blob_pyro._API.items():
        assert getattr(blob_pyro, name) is getattr(import_module(f"blob_pyro.{module}"), name), name
    assert set(dir(blob_pyro)) == set(blob_pyro.__all__) and "__version__" in blob_pyro.__all__
    with pytest.raises(AttributeError, match="no attribute 'TrainConfig'"):
        blob_pyro.TrainConfig  # noqa: B018 - the old name is gone


def test_importing_the_package_imports_no_model_library():
    code = "import sys, blob_pyro; print(sorted(m for m in ('peft', 'transformers', 'pyro', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
