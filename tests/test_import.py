"""``import salt_kernels`` stays light: it loads torch and the package, never Dynamo,
Triton, sympy, bitsandbytes, PEFT or transformers (those load on the paths that need
them: torch.compile, the triton backend, ``available_backends``, a quantized base,
``salt_kernels.peft``). Import time itself is measured, not asserted
(docs/verification.md, "Import time")."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch._dynamo", "torch._inductor", "triton", "sympy", "bitsandbytes", "peft", "transformers")


def _loaded_after(code: str) -> dict:
    """Which of HEAVY a fresh interpreter has imported after running ``code``."""
    probe = code + f"\nimport sys\nprint([m for m in {HEAVY!r} if m in sys.modules])\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("code", [
    "import salt_kernels",
    # salt-bench --help: the entry point's module and its parser
    "from salt_kernels.tools.bench.cli import parser; parser().format_help()",
    # a first call on CPU, forward and backward, with "auto" and each CPU backend built here
    textwrap.dedent("""
        import torch, salt_kernels
        from salt_kernels.ops.dispatch import unavailable_reason
        layer = salt_kernels.SALTLinear.from_linear(torch.nn.Linear(64, 32), rank=8, lora_rank=2)
        for backend in ("auto", "reference", "cpu"):
            if unavailable_reason(backend if backend != "auto" else "reference", "cpu") is None:
                layer.backend = backend
                layer(torch.randn(4, 64)).sum().backward()
    """),
], ids=["import", "salt-bench-parser", "first-cpu-call"])
def test_no_heavy_module_on_import(code):
    assert _loaded_after(code) == "[]"


def test_constant_mark_is_torchs():
    """backends.core.constant_for_compile marks a function exactly as
    torch.compiler.assume_constant_result does (which imports Dynamo to do it); if a torch
    release changes the mark, this fails and the helper must follow."""
    from salt_kernels.backends.core import constant_for_compile

    def ours():
        return 1

    def theirs():
        return 1

    constant_for_compile(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) and vars(ours)
