"""Two guards that make a green run mean what it says (issue "Runs you can trust", findings 2 and 8).

Registered by ``tests/conftest.py`` (``pytest_plugins``); ``-p no:suite_guards`` turns both off.

Collection guard
    Every test file (``python_files``: ``test_*.py``) under a directory collected as a whole must be
    collected. pytest skips some without a word: folders matching ``norecursedirs`` (its default
    list holds ``dist`` and ``build``; ``tests/dist`` never ran), an ``--ignore`` in ``addopts``, a
    conftest's ``collect_ignore``, a hook that drops the file. Each such file becomes a collection
    error naming the file and the reason, so the run stops as on any collection error
    (``Interrupted: 1 error during collection``, with ``--collect-only`` too). Files that fail to
    import (a name clash without ``__init__.py``, a syntax error) are already pytest's own
    collection errors. A subset is never mistaken for hidden files: only directory arguments are
    checked (``tests/x.py`` or ``tests/x.py::test_y`` is not), ``-k``/``-m`` deselect after
    collection, and an ``--ignore`` typed on the command line counts as asked for.

Process-leak guard
    No process the run started may outlive it. At configure the plugin
      * exports ``HM4SR_TEST_SESSION=<uuid>``; every child inherits it (checked for the processes
        of ``ray start`` and ``ray.init``: gcs_server, raylet, agents, workers, job drivers), so
        ``/proc/<pid>/environ`` marks the run's processes wherever they are re-parented;
      * makes pytest a child subreaper (Linux ``prctl``): orphans of the run, such as the daemons
        ``ray start`` leaves behind, are re-parented to pytest instead of init, so they stay
        descendants even when a process title (setproctitle) has overwritten their environ.
    At session end, after the fixtures' teardown and after shutting down an embedded Ray
    (``ray.init`` of the ``local_ray`` fixture), it takes the live descendants of pytest plus the
    live processes carrying the marker, waits ``leak_grace_period`` seconds (ini, default 10) for
    them to end, then fails the run naming each survivor (pid, parent, command line) and
    terminates it. Processes the run did not start (a RecBole run, a ``nohup`` training job and
    its Ray, other pytest runs) are neither descendants nor marked with this run's uuid, so they
    are never matched, whatever their name. The multiprocessing resource tracker and forkserver of
    the pytest process itself are exempt: they end with pytest.

``processes_with_env``, ``descendants``, ``process_table`` and ``terminate`` also serve fixtures
that must stop exactly what they started (``tests/jobs/test_job_submit.py``).
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

MARKER = "HM4SR_TEST_SESSION"
PR_SET_CHILD_SUBREAPER = 36


# --- processes, read from /proc ------------------------------------------------------------------

@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    state: str
    start: int                                    # clock ticks after boot: pid + start is unique

    @property
    def alive(self) -> bool:
        return self.state not in "ZX"


def _read_stat(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
    return Proc(pid, int(fields[1]), int(fields[3]), fields[0], int(fields[19]))


def process_table() -> dict[int, Proc]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := _read_stat(int(entry))) is not None:
            table[proc.pid] = proc
    return table


def descendants(roots: set[int], table: dict[int, Proc]) -> set[int]:
    """All processes below ``roots`` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def processes_with_env(key: str, value: str, table: dict[int, Proc]) -> set[int]:
    """Processes whose environment (as exec'd) holds ``key=value``."""
    entry = f"{key}={value}".encode()
    found = set()
    for pid in table:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if entry in f.read().split(b"\0"):
                    found.add(pid)
        except OSError:                           # gone, or not ours to read
            pass
    return found


def describe(pid: int, table: dict[int, Proc]) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = "?"
    parent = table[pid].ppid if pid in table else "?"
    return f"pid {pid} (parent {parent}): {cmdline[:200]}"


def terminate(pids: set[int], table: dict[int, Proc], grace: float = 5.0) -> set[int]:
    """SIGTERM ``pids``, SIGKILL whatever still runs after ``grace`` seconds; returns the pids that
    needed SIGKILL. A pid is signalled only while its start time matches ``table`` (no reused pid is
    hit). Zombies left to this process (its subreaper orphans) are reaped."""
    targets = {pid: table[pid].start for pid in pids if pid in table}

    def running() -> set[int]:
        now = {pid: _read_stat(pid) for pid in targets}
        return {pid for pid, proc in now.items() if proc and proc.start == targets[pid] and proc.alive}

    def send(sig: int, to: set[int]) -> None:
        for pid in to:
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    send(signal.SIGTERM, running())
    deadline = time.monotonic() + grace
    while (left := running()) and time.monotonic() < deadline:
        time.sleep(0.2)
    send(signal.SIGKILL, left)
    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in targets:                           # only the pids killed here: no Popen's child
        proc = _read_stat(pid)
        if proc and proc.start == targets[pid] and proc.ppid == os.getpid() and not proc.alive:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
    return left


# --- the plugin -----------------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("leak_grace_period", "seconds the process-leak guard waits for the run's processes "
                  "to end before failing the run", default="10")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(CollectionGuard(config), "suite_guards_collection")
    config.pluginmanager.register(LeakGuard(config), "suite_guards_leaks")


def _matches(pattern: str, path: Path) -> bool:
    """pytest's path patterns: a bare name pattern matches the last component, else the path's end."""
    if os.sep not in pattern and "/" not in pattern:
        return fnmatch.fnmatch(path.name, pattern)
    return fnmatch.fnmatch(str(path), pattern if os.path.isabs(pattern) else f"*{os.sep}{pattern}")


def _command_line_ignores(args: tuple[str, ...] | list[str]) -> tuple[list[Path], list[str]]:
    """``--ignore`` paths and ``--ignore-glob`` patterns typed on the command line (not addopts)."""
    found: dict[str, list[str]] = {"--ignore": [], "--ignore-glob": []}
    args = list(args)
    for i, arg in enumerate(args):
        for flag in found:
            if arg == flag and i + 1 < len(args):
                found[flag].append(args[i + 1])
            elif arg.startswith(flag + "="):
                found[flag].append(arg.split("=", 1)[1])
    return ([Path(os.path.abspath(p)) for p in found["--ignore"]],
            [os.path.abspath(g) for g in found["--ignore-glob"]])


class CollectionGuard:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.seen: set[Path] = set()

    @pytest.hookimpl
    def pytest_collectstart(self, collector: pytest.Collector) -> None:
        if isinstance(collector, pytest.File):
            self.seen.add(collector.path)

    def whole_directories(self) -> list[Path]:
        """The directory arguments of this run (testpaths when none is given)."""
        dirs = []
        for arg in self.config.args:
            if "::" in arg:
                continue
            path = Path(os.path.abspath(os.path.join(self.config.invocation_params.dir, arg)))
            if path.is_dir():
                dirs.append(path)
        return dirs

    def expected(self, root: Path) -> set[Path]:
        patterns = self.config.getini("python_files")
        found = set()
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"
                          and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))]
            found.update(Path(folder, name) for name in files
                         if name.endswith(".py") and any(_matches(p, Path(folder, name)) for p in patterns))
        return found

    def why(self, session: pytest.Session, root: Path, path: Path) -> str:
        norecurse = self.config.getini("norecursedirs")
        addopts_ignores = [Path(os.path.abspath(p)) for p in self.config.getoption("ignore") or []]
        current = root
        for part in path.relative_to(root).parts:
            current = current / part
            shown = os.path.relpath(current, self.config.rootpath)
            if current.is_dir() and (pattern := next((p for p in norecurse if _matches(p, current)), None)):
                return (f"not collected: folder {shown}/ matches norecursedirs pattern {pattern!r} (pytest "
                        f"skips such folders silently; its default list holds dist and build): rename the "
                        f"folder or set norecursedirs")
            if current in addopts_ignores:
                return f"not collected: --ignore={shown} comes from addopts or PYTEST_ADDOPTS"
            hooks = session.gethookproxy(current.parent)
            if hooks.pytest_ignore_collect(collection_path=current, config=self.config):
                return (f"not collected: pytest_ignore_collect is true for {shown} (collect_ignore or "
                        f"collect_ignore_glob in a conftest, --ignore-glob in addopts, or a plugin)")
        return "not collected: no collector was made for it (a conftest or plugin pytest_collect_file hook)"

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session) -> None:
        if session.shouldfail or session.shouldstop:  # collection stopped early (--maxfail)
            return
        cli_ignores, cli_globs = _command_line_ignores(self.config.invocation_params.args)
        for root in self.whole_directories():
            for path in sorted(self.expected(root) - self.seen):
                if any(path == p or p in path.parents for p in cli_ignores) or \
                        any(fnmatch.fnmatch(str(path), g) for g in cli_globs):
                    continue
                nodeid = Path(os.path.relpath(path, self.config.rootpath)).as_posix()
                reason = self.why(session, root, path)
                report = pytest.CollectReport(nodeid, "failed", result=[], longrepr=reason)
                session.ihook.pytest_collectreport(report=report)


class LeakGuard:
    # One per process: a pytest run inside this one (pytester's inline runs) stays inert, so it never
    # mistakes the outer run's processes for its own leaks.
    active: LeakGuard | None = None

    def __init__(self, config: pytest.Config):
        self.config = config
        self.leaks: list[str] = []
        self.inert = LeakGuard.active is not None
        if self.inert:
            return
        LeakGuard.active = self
        self.marker = uuid.uuid4().hex
        os.environ[MARKER] = self.marker          # inherited by every process started from here on
        self.subreaper = self._prctl_subreaper(1)

    @staticmethod
    def _prctl_subreaper(on: int) -> bool:
        if not sys.platform.startswith("linux"):
            return False
        try:
            return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, on, 0, 0, 0) == 0
        except (OSError, AttributeError):
            return False

    @staticmethod
    def _exempt() -> set[int]:
        """multiprocessing's helpers of this very process: they exit when pytest does."""
        pids = set()
        if tracker := sys.modules.get("multiprocessing.resource_tracker"):
            pids.add(getattr(getattr(tracker, "_resource_tracker", None), "_pid", None))
        if forkserver := sys.modules.get("multiprocessing.forkserver"):
            pids.add(getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None))
        return {pid for pid in pids if pid}

    def started_by_run(self) -> tuple[set[int], dict[int, Proc]]:
        table = process_table()
        me = os.getpid()
        found = descendants({me}, table) | processes_with_env(MARKER, self.marker, table)
        found -= {me} | self._exempt()
        return {pid for pid in found if table[pid].alive}, table

    @pytest.hookimpl(trylast=True)                # after the runner's teardown of all fixtures
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.inert:
            return
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()                        # the embedded Ray of the local_ray fixture
        deadline = time.monotonic() + float(self.config.getini("leak_grace_period"))
        while (left := self.started_by_run())[0] and time.monotonic() < deadline:
            time.sleep(0.25)
        pids, table = left
        if not pids:
            return
        self.leaks = [describe(pid, table) for pid in sorted(pids)]
        terminate(pids, table)
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.leaks:
            return
        grace = self.config.getini("leak_grace_period")
        terminalreporter.section("process leak", sep="=", red=True, bold=True)
        terminalreporter.line(f"{len(self.leaks)} process(es) started by this run still ran {grace} s "
                              f"after it ended (terminated now):", red=True)
        for line in self.leaks:
            terminalreporter.line("  " + line)
        message = f"{len(self.leaks)} process(es) started by the run outlived it"
        terminalreporter.stats.setdefault("error", []).append(
            pytest.CollectReport("suite_guards::process-leak", "failed", longrepr=message, result=[]))

    def pytest_unconfigure(self) -> None:
        if not self.inert:
            if self.subreaper:
                self._prctl_subreaper(0)
            LeakGuard.active = None
