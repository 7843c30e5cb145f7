"""The documentation cannot rot: every Python code block in README.md and docs/*.md whose
fence reads ```` ```python runnable ```` runs and must succeed: a document's blocks run in
order in one fresh interpreter, as a reader would run them (a later block may use what an
earlier one defined).
Blocks fenced plain ```` ```python ```` are illustrations and are not run. Links between
the documents must resolve inside the repository (see docs/verification.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "python runnable"
# Per document. Generous: on a loaded 2-core machine importing transformers alone took 40 s.
TIMEOUT_S = float(os.environ.get("SALT_DOCS_TIMEOUT", "600"))

def _blocks(path: Path):
    """(line number, info string, code) of each fenced code block in ``path``. A fence
    closes at a line of at least as many backticks as opened it (CommonMark), so a block
    can show a fence inside a longer one."""
    fence, info, start, lines = None, "", 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            m = re.match(r"^(`{3,})([^`]*)$", line)
            if m:
                fence, info, start, lines = m.group(1), m.group(2).strip(), number, []
        elif re.match(rf"^{fence}`*\s*$", line):
            yield start, info, "\n".join(lines) + "\n"
            fence = None
        else:
            lines.append(line)


RUNNABLE = [(p, line, code) for p in DOCS for line, info, code in _blocks(p) if info == MARKER]


def test_there_are_runnable_blocks():
    names = {p.name for p, _, _ in RUNNABLE}
    assert "README.md" in names and "model-guide.md" in names, names
    # a near-miss of the marker would silently never run
    for p in DOCS:
        for line, info, _ in _blocks(p):
            assert info == MARKER or "runnable" not in info, f"{p.name}:{line}: fence {info!r}"


RUNNABLE_DOCS = sorted({p for p, _, _ in RUNNABLE})
# Runs the blocks in order, each compiled under its own "file:line" so that a traceback
# names the document and the block.
_RUNNER = """
import json, sys
ns = {"__name__": "__main__"}
for where, code in json.load(open(sys.argv[1])):
    print(f"--- running {where}", flush=True)
    exec(compile(code, where, "exec"), ns)
"""


@pytest.mark.parametrize("path", RUNNABLE_DOCS, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE_DOCS])
def test_runnable_blocks(path, tmp_path):
    """A fresh interpreter per document, in an empty directory (files a block writes stay
    there), with this checkout importable. One torch thread: on a shared 2-core machine
    OpenMP's spinning threads made the SVDs several times slower."""
    import json

    blocks = [(f"{p.relative_to(ROOT)}:{line}", code) for p, line, code in RUNNABLE if p == path]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "run_blocks.py").write_text(_RUNNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env.pop("TRITON_INTERPRET", None)  # run as a user would (tests/conftest.py sets it)
    proc = subprocess.run([sys.executable, "run_blocks.py", "blocks.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"{path.relative_to(ROOT)} failed\n--- stdout\n{proc.stdout[-4000:]}"
                                  f"\n--- stderr\n{proc.stderr[-4000:]}")


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_stay_inside_the_repository_and_resolve(path):
    text = path.read_text()
    assert "DESIGN.md" not in text  # (links outside the repository fail the resolution check below)
    # user docs describe the product, not how it was built
    for phrase in ("session", "issue #", "the lead", "our machine", "earlier version"):
        assert phrase not in text.lower(), f"{path.name}: {phrase!r}"
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.is_relative_to(ROOT), f"{path.name}: link {target} leaves the repository"
        assert file.exists(), f"{path.name}: link {target} does not exist"


def test_license_matches_package_metadata():
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a notice
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.M)
