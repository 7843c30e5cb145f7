"""The package's architecture, read from its own source (docs/design.md, "Architecture"):
imports flow one way through the layers, with no cycle (lazy imports and
``importlib.import_module`` strings counted); the library never imports the tools; one
resolver serves plain and mixed-adapter calls; the public API and the old command names
stay."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import salt_kernels
from salt_kernels.ops import dispatch

PACKAGE = Path(salt_kernels.__file__).resolve().parent
ROOT = PACKAGE.parent

# Lower layers never import higher ones. Root modules: _C is the compiled extension, the
# public API (__init__) re-exports the model level and below, and aot.py, gpucheck.py,
# bench.py are aliases of the tools (python -m salt_kernels.aot).
LAYERS = {"_C": -1, "backends": 0, "ops": 1, "nn": 2, "model": 3, "peft": 4, "__init__": 5, "tools": 6,
          "aot": 6, "gpucheck": 6, "bench": 6}
TOOLS = 6


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path | None]:
    """Every module of the package, and the compiled extension (no imports of its own)."""
    return {**{_module_name(p): p for p in PACKAGE.rglob("*.py")}, "salt_kernels._C": None}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__" if len(parts) == 1 else parts[1]]


def _imports(module: str, path: Path, known: set) -> set:
    """Every package module ``module`` imports, at any depth of its code (lazy imports
    included), plus the module names it imports by string (``importlib.import_module``
    arguments, and the values of a ``*_MODULES`` table of names to modules)."""
    out = set()
    if path is None:
        return out
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def add(target: str, names=()):
        for name in names:
            if f"{target}.{name}" in known:
                out.add(f"{target}.{name}")
                break
        else:
            if target in known:
                out.add(target)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(base, [alias.name])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            out.update(a.value for a in node.args if isinstance(a, ast.Constant) and a.value in known)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", "").endswith("_MODULES") for t in targets):  # name -> module to import
                out.update(v.value for v in node.value.values if isinstance(v, ast.Constant) and v.value in known)
    out.discard(module)
    return out


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_the_graph_is_read_from_every_kind_of_import(graph):
    """The reader itself: relative, lazy (inside a function) and string imports count."""
    assert "salt_kernels.ops.linear" in graph["salt_kernels.ops"]  # from .linear import ...
    assert "salt_kernels.backends.triton" in graph["salt_kernels.ops.dispatch"]  # by name, _BACKEND_MODULES
    assert "salt_kernels.tools.bench" in graph["salt_kernels.tools.gpucheck.steps"]  # lazy, inside a step
    assert len(graph) > 40


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: each must be a single module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_flow_down_the_layers(graph):
    upward = [(src, dst) for src, dsts in graph.items() for dst in dsts if _layer(src) < _layer(dst)]
    assert upward == []


def test_the_library_never_imports_the_tools(graph):
    library = [m for m in graph if _layer(m) < TOOLS]
    assert [(m, t) for m in library for t in graph[m] if _layer(t) == TOOLS] == []


def test_the_library_loads_no_tool_at_run_time():
    """Importing the package (and its PEFT method) and running plain and mixed calls,
    forward and backward, leaves every tool module unloaded."""
    code = """
import sys, torch
import salt_kernels as sk
try:
    import salt_kernels.peft
except ImportError:
    pass
layer = sk.SALTLinear(12, 10, 4, 2)
x = torch.randn(3, 12, requires_grad=True)
layer(x).sum().backward()
sk.salt_linear(x, layer.U, layer.V, layer.sigma[None], layer.X[None], layer.Y[None],
               adapter_index=torch.zeros(3, dtype=torch.int64)).sum().backward()
tools = sorted(m for m in sys.modules if m.startswith(("salt_kernels.tools", "salt_kernels.aot",
                                                       "salt_kernels.gpucheck", "salt_kernels.bench")))
print("TOOLS", tools)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TOOLS []" in out.stdout, out.stdout


def test_one_resolver_for_plain_and_mixed_calls():
    """Only ops/dispatch.py maps backend names to modules or imports a backend by name;
    plain and mixed calls resolve through its one cache, and clear_backend_cache empties it."""
    resolvers = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                 if "import_module(" in p.read_text() and "tools" not in p.parts]
    assert resolvers == ["ops/dispatch.py"]
    dispatch.clear_backend_cache()
    assert dispatch._RESOLVED == {} and dispatch._IMPLS == {}
    torch.manual_seed(0)
    x, U, V = torch.randn(4, 6), torch.randn(5, 3), torch.randn(6, 3)
    sigma, X, Y = torch.rand(2, 3), torch.randn(2, 3, 1), torch.randn(2, 1, 3)
    salt_kernels.salt_linear(x, U, V, sigma[0], X[0], Y[0])
    salt_kernels.salt_linear(x, U, V, sigma, X, Y, adapter_index=torch.tensor([0, 1, 1, 0]))
    sigma.requires_grad_(True)
    salt_kernels.salt_linear(x, U, V, sigma, X, Y, adapter_index=torch.tensor([0, 1, 1, 0])).sum().backward()
    needs = {key[3] for key in dispatch._RESOLVED}
    assert needs == {dispatch.PLAIN, dispatch.MIXED, dispatch.MIXED_BACKWARD}
    assert {need for _, need in dispatch._IMPLS} == needs
    dispatch.clear_backend_cache()
    assert dispatch._RESOLVED == {} and dispatch._IMPLS == {} and dispatch._warned == set()


def test_every_backend_declares_what_it_implements():
    """The declarations the resolver reads (salt_kernels.backends): the plain forward and
    availability everywhere; mixed forwards with their gradients and rank limits."""
    for name in dispatch._BACKEND_MODULES:
        mod, err = dispatch._module(name)
        if mod is None:
            continue  # an optional piece missing here
        assert callable(mod.availability) and callable(mod.salt_linear_2d), name
    ref = dispatch._module("reference")[0]
    assert ref.MULTI_BACKWARD and ref.MULTI_BASIS_BACKWARD and not hasattr(ref, "MAX_RANK")
    triton = dispatch._module("triton")[0]
    if triton is not None:
        assert not getattr(triton, "MULTI_BACKWARD", False) and triton.MAX_RANK == 256
        assert triton.MULTI_MAX_RANK == {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}


PUBLIC_API = ["AdapterFileError", "AdapterFileWarning", "BackendUnavailableError", "SALTConv2d", "SALTLinear",
              "adapters", "delete_adapter", "list_adapters", "set_adapter", "apply_salt", "available_backends",
              "export_lora", "load_salt", "merge_salt", "print_trainable_parameters", "read_salt_config",
              "save_salt", "trainable_parameters", "salt_linear", "salt_regularizer", "truncated_svd", "warmup",
              "why_unavailable", "__version__"]


def test_the_public_api_is_unchanged():
    assert sorted(salt_kernels.__all__) == sorted(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(salt_kernels, name) is not None, name
    assert callable(salt_kernels.warmup) and callable(salt_kernels.adapters)
    from salt_kernels.backends.extension import cpu_gemm_dtype  # noqa: F401  (documented path)
    from salt_kernels.ops import salt_linear_multi  # noqa: F401  (documented: check_range=False)


@pytest.mark.parametrize("old,new", [("salt_kernels.aot", "salt_kernels.tools.aot"),
                                     ("salt_kernels.gpucheck", "salt_kernels.tools.gpucheck"),
                                     ("salt_kernels.bench", "salt_kernels.tools.bench")])
def test_old_command_names_are_aliases(old, new):
    """``python -m`` under the old names runs the tool (its --help names the new one)."""
    out = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage:" in out.stdout
    if new != "salt_kernels.tools.bench":  # (salt-bench names itself by its console script)
        assert f"python -m {new}" in out.stdout
