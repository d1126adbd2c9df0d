"""A wheel installed outside the repository runs the native kernels, not a silent fallback.

The wheel is built from this checkout and installed (without dependencies: those come from
this environment's site-packages through a .pth line) into a fresh virtual environment; a
child there, started outside the repository, must choose the `c` backend and compute the same
logits as this checkout does. Before `q4_0.h` shipped, such an install fell back to torch-int4.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from model import Engine
from model.build import build_demo

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
import model
from model import Engine
from model.kernels import describe
engine = Engine.load(sys.argv[1])
print(json.dumps({"file": model.__file__, "kernel": describe(), "logits": engine.logits([1, 2, 3, 4])[-1].tolist()}))
"""


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_runs_the_native_kernels(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info into the tree it builds
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = {p.name for p in (ROOT / "model" / "kernels").iterdir() if p.suffix in (".c", ".h")}
    assert {f"model/kernels/{n}" for n in kernel_files} <= names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. from this environment
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600)

    pkg = tmp_path / "demo"
    build_demo(pkg)
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([str(py), "-c", CHILD, str(pkg)], cwd=work, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ST_KERNEL_CACHE": str(tmp_path / "kc")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    assert str(site) in seen["file"]  # the installed copy ran, not this checkout
    assert seen["kernel"]["backend"] == "c" and seen["kernel"]["fallback_reason"] is None
    torch.set_num_threads(1)
    ours = Engine.load(pkg).logits([1, 2, 3, 4])[-1]
    assert torch.allclose(torch.tensor(seen["logits"]), ours, rtol=0, atol=1e-5)
