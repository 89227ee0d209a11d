"""Runs every notebook's fast checks with `nbdev_test`, one pytest case per notebook."""
import subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def test_notebooks_exist():
    assert any(p.name == "index.ipynb" for p in NOTEBOOKS), "nbs/index.ipynb is missing"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb):
    nbdev_test = Path(sys.executable).parent / "nbdev_test"  # the one installed beside this interpreter
    cmd = [str(nbdev_test), "--path", str(nb)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"nbdev_test failed for {nb.name}:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
