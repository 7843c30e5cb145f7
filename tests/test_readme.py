"""README's fresh-machine commands: the test command is exactly what CI runs, and the
main job installs no test-only extras. (README's code blocks run in tests/test_docs.py.)"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"^python3 -m venv \.venv .*$", readme, re.M)


def test_ci_runs_readme_test_command():
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines()
                if l.startswith("python3 -m venv")]
    assert len(ci_lines) == 1
    assert ci_lines[0] in _commands()
    assert ci_lines[0].endswith("-e '.[test]' && .venv/bin/python -m pytest")


def test_main_job_installs_only_what_it_needs():
    main = [c for c in _commands() if "salt-bench" in c]
    assert len(main) == 1, _commands()
    assert "[test]" not in main[0] and "--no-build-isolation -e . &&" in main[0]


def test_ci_runs_what_the_default_test_run_leaves_out():
    """The default run deselects the slow (whole-package) tests; CI runs them as its
    slow-tests job, builds the CUDA part without a GPU and checks that a second install
    reuses the objects; docs/verification.md names every job."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"""^addopts = ".*-m 'not slow'.*"$""", pyproject, re.M)
    assert re.search(r'^    "slow: ', pyproject, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    readme_line = ci.index("\npython3 -m venv")
    assert 0 <= ci.index("export SALT_KERNELS_BUILD_CUDA=1") < readme_line
    assert ".venv/bin/python -m pytest -m slow" in ci and "ninja: no work to do" in ci
    jobs = re.search(r"^\[ \$\{#JOBS\[@\]\} -gt 0 \] \|\| JOBS=\((.*)\)$", ci, re.M).group(1).split()
    assert set(jobs) == {"tests", "aot-tritons", "slow-tests", "reinstall"}, jobs
    verification = (ROOT / "docs" / "verification.md").read_text()
    for job in jobs:
        assert f"`{job}`" in verification, job
