"""PEFT's own custom-model tests with SALT's rows (``salt_rows.py``).

The tests come from the source distribution of the installed PEFT: ``tests/`` of
``peft-<version>.tar.gz``, which pip downloads once into a cache
(``$SALT_PEFT_SDIST_CACHE``, default ``~/.cache/salt_kernels``); ``$SALT_PEFT_TESTS``
may point at an unpacked ``tests/`` directory of the same version instead. This
conftest writes ``test_custom_models.py`` (with SALT's rows added to PEFT's lists, the
way PEFT adds a method), ``testing_common.py`` and ``testing_utils.py`` next to itself
(git-ignored) before pytest collects this directory, and keeps only the tests that run
a SALT row. Without PEFT, or when the source distribution cannot be fetched, the
directory collects one test that says why (skipped without PEFT, failed otherwise).

PEFT's test helpers import ``diffusers`` and ``datasets`` at module level, for tests of
other models; where they are not installed, empty stand-ins take their place while the
helpers import (no SALT row reaches them: a class that nothing is an instance of, a
function that raises).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
UPSTREAM = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
STAMP = HERE / "_upstream_version.txt"
_problem: str | None = None


def _sdist(version: str) -> Path:
    cache = Path(os.environ.get("SALT_PEFT_SDIST_CACHE", Path.home() / ".cache" / "salt_kernels"))
    tarball = cache / f"peft-{version}.tar.gz"
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"peft=={version}", "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not tarball.exists():
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
    return tarball


def _read_upstream(version: str) -> dict[str, str]:
    local = os.environ.get("SALT_PEFT_TESTS")
    if local:
        return {name: (Path(local) / name).read_text() for name in UPSTREAM}
    with tarfile.open(_sdist(version)) as tar:
        return {name: tar.extractfile(f"peft-{version}/tests/{name}").read().decode() for name in UPSTREAM}


def _list_end(node: ast.List, lines: list[bytes]) -> tuple[int, int]:
    """(line index, byte column) right after the last element of a list literal (or after
    its ``[`` if empty): where ``, *rows`` is inserted."""
    if node.elts:
        last = node.elts[-1]
        return last.end_lineno - 1, last.end_col_offset
    return node.lineno - 1, node.col_offset + 1


def _parametrize_list(function: ast.FunctionDef) -> ast.List:
    lists = [d.args[1] for d in function.decorator_list
             if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "parametrize"
             and len(d.args) > 1 and isinstance(d.args[1], ast.List)]
    if len(lists) != 1:
        raise RuntimeError(f"{function.name}: expected one parametrize list literal, found {len(lists)}")
    return lists[0]


def add_salt_rows(source: str, rows) -> str:
    """``source`` of PEFT's test_custom_models.py with ``rows``' entries appended to each
    list they name; raises if PEFT no longer has one of them (the rows need updating)."""
    tree = ast.parse(source)
    targets: dict[str, ast.List] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    targets[target.id] = node.value
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                key = f"{node.name}.{getattr(item, 'name', '')}"
                if isinstance(item, ast.FunctionDef) and key in rows.INLINE:
                    targets[key] = _parametrize_list(item)
    wanted = ["TEST_CASES", "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", "MIXED_ADAPTER_TEST_CASES", *rows.INLINE]
    missing = [key for key in wanted if key not in targets]
    if missing:
        raise RuntimeError(f"PEFT's test_custom_models.py has no {missing}: update tests/peft_suite/salt_rows.py")
    lines = source.encode().splitlines(keepends=True)
    inserts = []
    for key in wanted:
        expr = f"_salt_rows.INLINE[{key!r}]" if key in rows.INLINE else f"_salt_rows.{key}"
        line, col = _list_end(targets[key], lines)
        inserts.append((line, col, (", " if targets[key].elts else "") + f"*{expr}"))
    for line, col, text in sorted(inserts, reverse=True):
        lines[line] = lines[line][:col] + text.encode() + lines[line][col:]
    first = targets["TEST_CASES"]
    at = next(n for n in tree.body if isinstance(n, ast.Assign) and n.value is first).lineno - 1
    lines.insert(at, b"from . import salt_rows as _salt_rows  # SALT's rows (tests/peft_suite)\n")
    return b"".join(lines).decode()


def _load_dataset(*args, **kwargs):
    raise RuntimeError("datasets is not installed (a stand-in for PEFT's test imports)")


def _import_helpers() -> None:
    """Import PEFT's test helpers, with empty modules standing in for the imports that no
    SALT row uses (module docstring) while they import, and only then: nothing else in
    the session sees the stand-ins."""
    stand_ins = {
        "diffusers": {"StableDiffusionPipeline": type("StableDiffusionPipeline", (), {})},
        "datasets": {"load_dataset": _load_dataset},
    }
    added = []
    for name, attrs in stand_ins.items():
        if importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            added.append(name)
    try:
        for helper in ("testing_utils", "testing_common"):
            importlib.import_module(f"{__package__}.{helper}")
    finally:
        for name in added:
            del sys.modules[name]


def _prepare() -> None:
    import peft

    from . import salt_rows

    # the PEFT version and this harness: either changing writes the files again
    harness = hashlib.sha256(Path(__file__).read_bytes() + Path(salt_rows.__file__).read_bytes()).hexdigest()[:16]
    stamp = f"peft {peft.__version__}, harness {harness}"
    version = peft.__version__
    if STAMP.exists() and STAMP.read_text() == stamp and all((HERE / n).exists() for n in UPSTREAM):
        return
    sources = _read_upstream(version)
    sources["test_custom_models.py"] = add_salt_rows(sources["test_custom_models.py"], salt_rows)
    for name, text in sources.items():
        (HERE / name).write_text(text)
    STAMP.write_text(stamp)


# PEFT's save_pretrained looks the model ids of the test models ("MLP", ...) up on the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    if importlib.util.find_spec("peft") is None:
        raise RuntimeError("peft is not installed (pip install 'peft>=0.15', in the 'test' extra)")
    _prepare()
    _import_helpers()
except Exception as exc:  # noqa: BLE001 - reported by the placeholder test below
    _problem = f"PEFT's custom-model tests with SALT rows cannot run: {exc}"
    for name in UPSTREAM:
        (HERE / name).unlink(missing_ok=True)
    STAMP.unlink(missing_ok=True)


def pytest_collection_modifyitems(config, items):
    """Keep the tests of this directory that run a SALT row; mark the exemptions."""
    from . import salt_rows

    keep, drop = [], []
    for item in items:
        if HERE not in Path(item.path).parents:
            keep.append(item)
            continue
        if item.path.name == "test_placeholder.py":
            (keep if _problem else drop).append(item)
            continue
        row = _salt_row(item)
        if row is None:
            drop.append(item)
            continue
        keep.append(item)
        for tests, rows, raises, reason in salt_rows.EXEMPT:
            if item.originalname in tests and row in rows:
                item.add_marker(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _salt_row(item) -> str | None:
    """The SALT row an item runs (its name, or the config's repr), or None."""
    from salt_kernels.peft import SaltConfig

    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    for value in callspec.params.values():
        if isinstance(value, str) and "SALT" in value:
            return value
        if value is SaltConfig:
            return "SaltConfig"
        if isinstance(value, SaltConfig):
            return repr(value)
    return None
