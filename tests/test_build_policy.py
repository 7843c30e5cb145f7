"""setup.py's build policy, read from the extension it configures (nothing is compiled):
the CUDA part is built where it can run (torch sees a GPU) or where it is asked for
(SALT_KERNELS_BUILD_CUDA=1, which CI sets), never with SALT_KERNELS_NO_CUDA=1; the
objects stay in build/ so that a second install reuses them. (That a second
`pip install -e` really recompiles nothing is CI's reinstall job, .ci/run.)"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs setup.py once per configuration (environment flags, and whether torch sees a
# GPU), with setuptools.setup captured, then finalizes build_ext as pip would.
_PROBE = textwrap.dedent("""
    import json, os, runpy, sys, setuptools, torch
    from setuptools.dist import Distribution
    seen_gpu = torch.cuda.is_available
    out = []
    for gpu, flags in json.loads(sys.argv[1]):
        for k in [k for k in os.environ if k.startswith("SALT_KERNELS_")]:
            del os.environ[k]
        os.environ.update(flags)
        torch.cuda.is_available = (lambda: True) if gpu else seen_gpu  # as where torch sees a GPU
        captured = {}
        setuptools.setup = lambda **kw: captured.update(kw)
        runpy.run_path("setup.py")
        ext = captured["ext_modules"][0]
        cmd = Distribution(dict(name="probe", **captured)).get_command_obj("build_ext")
        cmd.ensure_finalized()
        out.append(dict(cuda=any(s.endswith(".cu") for s in ext.sources), build_temp=cmd.build_temp))
    print(json.dumps(out))
""")

_HAS_TOOLKIT = torch.version.cuda is not None and (
    shutil.which("nvcc") is not None or any(Path(h or "/nonexistent", "bin", "nvcc").exists() for h in
                                            (os.environ.get("CUDA_HOME"), "/usr/local/cuda")))
needs_toolkit = pytest.mark.skipif(not _HAS_TOOLKIT, reason="needs a CUDA build of torch and a CUDA toolkit")
CONFIGS = {  # name: (torch sees a GPU, flags)
    "as is": (False, {}),
    "asked": (False, {"SALT_KERNELS_BUILD_CUDA": "1"}),
    "gpu": (True, {}),
    "asked, no cuda": (False, {"SALT_KERNELS_BUILD_CUDA": "1", "SALT_KERNELS_NO_CUDA": "1"}),
    "gpu, no cuda": (True, {"SALT_KERNELS_NO_CUDA": "1"}),
}


@pytest.fixture(scope="module")
def configured() -> dict:
    """{configuration name: {"cuda": CUDA part configured, "build_temp": where the objects go}}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALT_KERNELS_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(CONFIGS.values()))], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(zip(CONFIGS, json.loads(out.stdout.strip().splitlines()[-1])))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the build on a machine without a GPU")
def test_no_gpu_builds_the_cpu_part_only(configured):
    assert configured["as is"]["cuda"] is False


@needs_toolkit
def test_cuda_part_when_asked_for_or_a_gpu_is_seen(configured):
    assert configured["asked"]["cuda"] is True and configured["gpu"]["cuda"] is True


def test_no_cuda_wins(configured):
    assert configured["asked, no cuda"]["cuda"] is False and configured["gpu, no cuda"]["cuda"] is False


def test_objects_stay_in_the_checkout(configured):
    """pip install -e builds in a new temporary directory each time; the objects go to
    build/ instead, one directory per Python, torch and CUDA choice."""
    cpu = Path(configured["gpu, no cuda"]["build_temp"])
    assert cpu.parent == ROOT / "build" and torch.__version__ in cpu.name and cpu.name.endswith("-cpu")
    if _HAS_TOOLKIT:
        assert Path(configured["asked"]["build_temp"]).name == cpu.name[:-len("cpu")] + "cuda"
