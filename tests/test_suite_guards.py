"""The guards of tests/suite_guards.py, run by a separate pytest on a mini-project holding a copy of
the plugin: a test file under ``dist/`` (skipped by pytest's default ``norecursedirs``) and a test
that leaves processes running must fail the run and be named; a clean tree, or a subset asked for
on the command line, must pass."""

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from suite_guards import MARKER, process_table, processes_with_env, terminate

GUARDS = Path(__file__).with_name("suite_guards.py")


@pytest.fixture
def project(tmp_path):
    """tests/test_top.py and tests/<folder>/test_inner.py, with the guards registered."""
    def make(folder="parallel", ini="", conftest=""):
        (tmp_path / "pytest.ini").write_text(f"[pytest]\ntestpaths = tests\n{ini}")
        inner = tmp_path / "tests" / folder
        inner.mkdir(parents=True)
        shutil.copy(GUARDS, tmp_path / "tests")
        (tmp_path / "tests" / "conftest.py").write_text(f'pytest_plugins = ["suite_guards"]\n{conftest}')
        (tmp_path / "tests" / "test_top.py").write_text("def test_top():\n    pass\n")
        (inner / "test_inner.py").write_text("def test_inner():\n    pass\n")
        return tmp_path
    return make


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"           # no third-party plugins: seconds per run
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-o", "leak_grace_period=1", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_file_under_dist_fails_the_run_with_file_and_reason(project):
    root = project("dist")
    for args in [(), ("--collect-only", "-q"), ("-k", "top")]:
        result = run(root, *args)
        assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout
        assert "ERROR tests/dist/test_inner.py" in result.stdout
        assert "not collected: folder tests/dist/ matches norecursedirs pattern 'dist'" in result.stdout


@pytest.mark.parametrize("ini, conftest, reason", [
    ("addopts = --ignore=tests/inner\n", "", "--ignore=tests/inner comes from addopts"),
    ("", 'collect_ignore = ["inner"]\n', "pytest_ignore_collect is true for tests/inner"),
    ("norecursedirs = inn*\n", "", "matches norecursedirs pattern 'inn*'"),
])
def test_other_silent_skips_are_named(project, ini, conftest, reason):
    result = run(project("inner", ini, conftest))
    assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout
    assert "tests/inner/test_inner.py" in result.stdout and reason in result.stdout


def test_nothing_hidden_passes(project):
    result = run(project("parallel"))
    assert result.returncode == 0, result.stdout
    assert "2 passed" in result.stdout


@pytest.mark.parametrize("args", [("tests/test_top.py",), ("tests/test_top.py::test_top",),
                                  ("--ignore=tests/dist",), ("--ignore", "tests/dist"), ("tests/dist",)])
def test_a_subset_asked_for_is_not_a_hidden_file(project, args):
    result = run(project("dist"), *args)
    assert result.returncode == 0, result.stdout
    assert "1 passed" in result.stdout


def test_deselected_files_are_not_hidden_files(project):
    result = run(project("parallel"), "-k", "top")
    assert result.returncode == 0, result.stdout
    assert "1 passed, 1 deselected" in result.stdout


LEAKY = '''
import subprocess

def test_leaves_processes():
    child = subprocess.Popen(["sleep", "97"])                                   # a child never waited for
    orphan = subprocess.run(["sh", "-c", "sleep 98 >/dev/null 2>&1 & echo $!"],  # re-parented on exit of sh
                            capture_output=True, text=True).stdout.strip()
    with open("pids.txt", "w") as f:
        f.write(f"{child.pid} {orphan}")
'''


def gone(pid: int) -> bool:
    proc = process_table().get(pid)
    return proc is None or not proc.alive


def test_processes_left_running_fail_the_run_and_are_ended(project):
    root = project("parallel")
    (root / "tests" / "test_leaky.py").write_text(LEAKY)
    result = run(root)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "process leak" in result.stdout and "ERROR suite_guards::process-leak" in result.stdout
    assert "sleep 97" in result.stdout and "sleep 98" in result.stdout
    assert all(gone(int(pid)) for pid in (root / "pids.txt").read_text().split())


def test_no_process_left_passes(project):
    result = run(project("parallel"))
    assert "process leak" not in result.stdout and result.returncode == 0, result.stdout


def test_an_orphan_is_found_by_the_marker_in_its_environment():
    marker = uuid.uuid4().hex
    env = os.environ | {MARKER: marker}
    pid = int(subprocess.run(["sh", "-c", "sleep 99 >/dev/null 2>&1 & echo $!"], env=env,
                             capture_output=True, text=True).stdout)
    table = process_table()
    assert processes_with_env(MARKER, marker, table) == {pid}
    assert processes_with_env(MARKER, uuid.uuid4().hex, table) == set()
    terminate({pid}, table, grace=2)
    assert gone(pid)
