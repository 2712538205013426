"""Resident memory of a process, from Linux's /proc/<pid>/status, for progress lines and benchmarks.

The peak is `VmHWM`, the high-water mark of the process's own memory map, not getrusage's
`ru_maxrss`: across fork/vfork + exec, `ru_maxrss` starts from the parent's peak, so a process
started by a large parent (a benchmark that built a 900 MB frame) reports the parent's peak before
doing anything. Elsewhere than Linux, the getrusage figures stand in.
"""

from __future__ import annotations

import resource
import sys


def _status_kib(field: str, pid: int | str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024       # Linux reports KiB


def _bytes(field: str, pid: int | str) -> int:
    kib = _status_kib(field, pid)
    if kib is not None:
        return kib * 1024
    # No /proc (not Linux): this process's getrusage figure. Another process that has exited or
    # is a zombie (no memory map, so no such line) gives 0, never this process's figure.
    return _maxrss() if pid == "self" else 0


def resident_bytes(pid: int | str = "self") -> int:
    """Current resident set size (VmRSS)."""
    return _bytes("VmRSS", pid)


def peak_resident_bytes(pid: int | str = "self") -> int:
    """Peak resident set size of the process's own memory map (VmHWM)."""
    return _bytes("VmHWM", pid)
