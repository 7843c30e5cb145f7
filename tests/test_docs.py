"""The documentation cannot rot: every Python code block in README.md and docs/*.md whose
fence reads ```` ```python runnable ```` runs and must succeed: a document's blocks run in
order in one fresh interpreter, as a reader would run them (a later block may use what an
earlier one defined).
Blocks fenced plain ```` ```python ```` are illustrations and are not run. Links between
the documents must resolve inside the repository, and their #anchors must name a heading
(see docs/verification.md)."""

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
    """A fresh interpreter per document, in an empty directory that must stay empty (a
    block writes to a temporary directory, not where the reader runs it), with this
    checkout importable. One torch thread: on a shared 2-core machine
    OpenMP's spinning threads made the SVDs several times slower."""
    import json

    blocks = [(f"{p.relative_to(ROOT)}:{line}", code) for p, line, code in RUNNABLE if p == path]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "run_blocks.py").write_text(_RUNNER)
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"  # (tmp: the blocks' temporary files, removed with tmp_path)
    cwd.mkdir(), tmp.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg", TMPDIR=str(tmp))
    env.pop("TRITON_INTERPRET", None)  # run as a user would (tests/conftest.py sets it)
    proc = subprocess.run([sys.executable, str(tmp_path / "run_blocks.py"), str(tmp_path / "blocks.json")], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"{path.relative_to(ROOT)} failed\n--- stdout\n{proc.stdout[-4000:]}"
                                  f"\n--- stderr\n{proc.stderr[-4000:]}")
    # a reader runs the blocks in a directory of their own: they must write to temporary ones
    left = sorted(p.name for p in cwd.iterdir())
    assert not left, f"{path.relative_to(ROOT)}: the blocks wrote {left} to the current directory"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The ids GitHub gives the headings of a Markdown file: lower case, punctuation
    dropped, spaces to hyphens, "-1", "-2", ... for repeats (headings inside code
    blocks are not headings)."""
    fenced = {n for start, _, code in _blocks(path) for n in range(start, start + code.count("\n") + 2)}
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m or number in fenced:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_anchors_follow_github(tmp_path):
    path = tmp_path / "page.md"
    path.write_text("# Model guide\n## SALT and PEFT's LoRA\n### `SaltConfig`\n## A, b: c\n## A, b: c\n"
                    "```\n# code\n```\n## [Link](x.md) text\n")
    assert list(anchors(path)) == ["model-guide", "salt-and-pefts-lora", "saltconfig", "a-b-c", "a-b-c-1",
                                   "link-text"]


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_stay_inside_the_repository_and_resolve(path):
    """Relative links name files of the repository, and their #anchors (in-page ones
    too) name headings of the target file."""
    text = path.read_text()
    assert "DESIGN.md" not in text  # (links outside the repository fail the resolution check below)
    # user docs describe the product, not how it was built
    for phrase in ("session", "issue #", "the lead", "our machine", "earlier version"):
        assert phrase not in text.lower(), f"{path.name}: {phrase!r}"
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        name, _, anchor = target.partition("#")
        file = (path.parent / name).resolve() if name else path
        assert file.is_relative_to(ROOT), f"{path.name}: link {target} leaves the repository"
        assert file.exists(), f"{path.name}: link {target} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in set(anchors(file)), f"{path.name}: link {target}: no such heading in {file.name}"


# Messages, docstrings and skip reasons tell users how to install too.
SOURCES = sorted(p for d in ("salt_kernels", "benchmarks", "tests", ".ci") for p in (ROOT / d).rglob("*")
                 if p.suffix in (".py", ".sh") and p.name != "test_docs.py")


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=[str(p.relative_to(ROOT)) for p in DOCS + SOURCES])
def test_installs_come_from_the_checkout(path):
    """salt_kernels is not on a package index: an install command names the checkout
    (``-e .``, ``-e '.[peft]'``), never the package."""
    for line in path.read_text().splitlines():
        for command in re.findall(r"pip install [^`|&;]*", line):
            assert not re.search(r"(^|[\s'\"])salt[_-]kernels\b", command.split("install", 1)[1]), \
                f"{path.name}: {command.strip()!r} installs a package that is not published"


def test_license_matches_package_metadata():
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a notice
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.M)
