"""Which code trained a run: a fingerprint of the package source that computes results, and the git
commit when the package runs from a git checkout.

Not part of a run's identity: every docs or refactoring commit would otherwise orphan every stored
run. It is recorded beside the identity instead (`run_identity.json`, a study's `results.json`), a
resume by other code says so in one line, and a study table whose runs come from more than one code
version says so under the table, so a re-run that reuses an old result is never silent about it.

    code_version()    # {"fingerprint": "3f1c...", "git": "9133ff6a2b41", "dirty": False}
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]

# Parts of the package that plan, schedule or report runs but compute none of their numbers.
NOT_COMPUTING = ("study", "serving", "compare.py", "stats.py", "run_folder.py", "tracking.py")


def source_files(package: Path = PACKAGE) -> list[Path]:
    """The package's .py files that shape a run's results, in a stable order."""
    files = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] not in NOT_COMPUTING:
            files.append(path)
    return files


def fingerprint(package: Path = PACKAGE) -> str:
    """sha256 over the computing source files (relative path + content), 12 hex digits."""
    digest = hashlib.sha256()
    for path in source_files(package):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _git(package: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def code_version(package: Path = PACKAGE) -> dict:
    """The fingerprint, and the git commit with whether the computing files differ from it (both
    None unless the package's files are tracked by the git checkout they sit in: an install inside
    someone else's repository is not that repository's commit)."""
    commit, dirty = None, None
    if _git(package, "ls-files", "--error-unmatch", "--", "__init__.py") is not None:
        commit = _git(package, "rev-parse", "--short=12", "HEAD")
    if commit is not None:
        computing = ["--", ":(glob)**/*.py", *(f":(exclude){p}" for p in NOT_COMPUTING),
                     *(f":(exclude){p}/**" for p in NOT_COMPUTING)]
        changed = _git(package, "status", "--porcelain", "--untracked-files=all", *computing)
        dirty = bool(changed) if changed is not None else None
    return {"fingerprint": fingerprint(package), "git": commit, "dirty": dirty}


def describe(code: dict | None) -> str:
    """`3f1c2a9b0d4e (git 9133ff6a2b41)`, `3f1c2a9b0d4e (git 9133ff6a2b41, modified)`, or
    `an unrecorded version` for a run trained before versions were recorded."""
    if not code or not code.get("fingerprint"):
        return "an unrecorded version"
    git = code.get("git")
    if not git:
        return code["fingerprint"]
    return f"{code['fingerprint']} (git {git}{', modified' if code.get('dirty') else ''})"
