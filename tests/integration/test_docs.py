"""The API reference builds from the docstrings (mkdocs + mkdocstrings), and the code passes the linter."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_builds_strictly(tmp_path):
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    # every module the reference lists was rendered with its docstring, e.g. fit's and RunConfig's
    for name in ("blob_pyro.infer.fit", "blob_pyro.config.RunConfig", "blob_pyro.model.BlobModel",
                 "blob_pyro.poutine.flipout.flipout", "blob_pyro.methods.apply_method"):
        assert f'id="{name}"' in api, name


def test_ruff_passes():
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "blob_pyro", "benchmarks", "scripts", "tests"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
