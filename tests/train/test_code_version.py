"""Which code trained a run: the source fingerprint, its record beside the run identity, the line a
resume by other code prints, and the study table's note when runs come from several code versions."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from hm4sr_dist.compare import Run
from hm4sr_dist.config import load_config
from hm4sr_dist.study.report import code_versions_note
from hm4sr_dist.train.code_version import code_version, describe, fingerprint
from hm4sr_dist.train.identity import RunIdentityError, check_or_record, read_identity, run_identity


def _package(root: Path) -> Path:
    pkg = root / "pkg"
    for rel, text in {"__init__.py": "", "model/enc.py": "X = 1\n", "study/report.py": "Y = 1\n",
                      "compare.py": "Z = 1\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_fingerprint_follows_computing_code_only(tmp_path):
    pkg = _package(tmp_path)
    before = fingerprint(pkg)
    (pkg / "study" / "report.py").write_text("Y = 2\n")          # reporting: same computation
    (pkg / "compare.py").write_text("Z = 2\n")
    assert fingerprint(pkg) == before
    (pkg / "model" / "enc.py").write_text("X = 2\n")             # the model: another computation
    changed = fingerprint(pkg)
    assert changed != before and len(changed) == 12
    (pkg / "model" / "enc.py").rename(pkg / "model" / "moved.py")  # a rename counts too
    assert fingerprint(pkg) != changed


def _git_repo(root: Path) -> list[str]:
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    return git


def test_git_commit_and_modified_flag(tmp_path):
    pkg = _package(tmp_path)
    outside = code_version(pkg)
    assert outside["git"] is None and outside["dirty"] is None
    assert describe(outside) == outside["fingerprint"]
    git = _git_repo(tmp_path)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    code_version.cache_clear()
    clean = code_version(pkg)
    assert clean["git"] and clean["dirty"] is False and f"(git {clean['git']})" in describe(clean)
    (pkg / "study" / "report.py").write_text("Y = 3\n")          # reporting code: not "modified"
    (tmp_path / "notes.txt").write_text("outside the package\n")
    code_version.cache_clear()
    assert code_version(pkg)["dirty"] is False
    (pkg / "model" / "new.py").write_text("W = 1\n")             # an untracked computing file
    code_version.cache_clear()
    assert code_version(pkg)["dirty"] is True
    (pkg / "model" / "new.py").unlink()
    (pkg / "model" / "enc.py").write_text("X = 3\n")
    code_version.cache_clear()
    assert code_version(pkg)["dirty"] is True and "modified" in describe(code_version(pkg))
    code_version.cache_clear()
    assert describe(None) == describe({}) == "an unrecorded version"


def test_a_package_untracked_inside_another_repository_has_no_commit(tmp_path):
    git = _git_repo(tmp_path)
    (tmp_path / "README").write_text("someone else's project\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    pkg = _package(tmp_path / "venv")                              # e.g. site-packages in a checkout
    code_version.cache_clear()
    assert code_version(pkg)["git"] is None and code_version(pkg)["dirty"] is None
    code_version.cache_clear()


def test_identity_records_the_code_and_a_resume_by_other_code_says_so(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    ident = run_identity(load_config("configs/hm4sr_paper.yaml", []), "data")
    old = {"fingerprint": "aaaaaaaaaaaa", "git": None, "dirty": None}
    new = {"fingerprint": "bbbbbbbbbbbb", "git": "0123456789ab", "dirty": False}
    assert check_or_record(run_dir, ident, code=old) == "new"
    assert read_identity(run_dir)["code"] == old
    assert check_or_record(run_dir, ident, code=old) == "same"
    assert capsys.readouterr().err == ""                        # same code: nothing to say
    assert check_or_record(run_dir, ident, code=new) == "same"   # other code: resumed, and said
    err = capsys.readouterr().err
    assert run_dir in err and "aaaaaaaaaaaa" in err and "bbbbbbbbbbbb (git 0123456789ab)" in err
    stored = read_identity(run_dir)
    assert stored["code"] == new and stored["code_history"] == [old]
    assert stored["hash"] == ident["hash"]                       # the identity itself is unchanged


def test_a_refused_resume_by_other_code_writes_and_says_nothing(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    old = {"fingerprint": "aaaaaaaaaaaa"}
    check_or_record(run_dir, run_identity(load_config("configs/hm4sr_paper.yaml", []), "data"), code=old)
    before = (tmp_path / "run" / "run_identity.json").read_bytes()
    clash = run_identity(load_config("configs/hm4sr_paper.yaml", ["optim.lr=0.01"]), "data")
    with pytest.raises(RunIdentityError):
        check_or_record(run_dir, clash, code={"fingerprint": "bbbbbbbbbbbb"})
    assert (tmp_path / "run" / "run_identity.json").read_bytes() == before
    assert capsys.readouterr().err == ""


def test_recording_without_a_code_version_keeps_the_stored_one(tmp_path):
    run_dir = str(tmp_path / "run")
    ident = run_identity(load_config("configs/hm4sr_paper.yaml", []), "data")
    a = {"fingerprint": "aaaaaaaaaaaa"}
    check_or_record(run_dir, ident, code=a)
    check_or_record(run_dir, ident)
    assert read_identity(run_dir)["code"] == a
    changed = run_identity(load_config("configs/hm4sr_paper.yaml", ["optim.lr=0.01"]), "data")
    assert check_or_record(run_dir, changed, allow_change=True) == "changed"
    assert read_identity(run_dir)["code"] == a and read_identity(run_dir)["previous"]["hash"] == ident["hash"]


def test_an_older_run_adopted_on_purpose_records_an_unrecorded_past(tmp_path, capsys):
    (tmp_path / "old" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    ident = run_identity(load_config("configs/hm4sr_paper.yaml", []), "data")
    code = {"fingerprint": "bbbbbbbbbbbb"}
    assert check_or_record(str(tmp_path / "old"), ident, allow_change=True, code=code) == "new"
    stored = read_identity(str(tmp_path / "old"))
    assert stored["code"] == code and stored["code_history"] == [None]
    assert "an unrecorded version" in capsys.readouterr().err


def _run(tmp_path: Path, name: str, code, history=()) -> Run:
    results = {"config": {}, "code": code, "code_history": list(history)}
    return Run(tmp_path / name, results, np.arange(3), np.zeros(3, dtype=np.int64))


def test_study_note_names_each_code_version_and_its_runs(tmp_path):
    a = {"fingerprint": "aaaaaaaaaaaa"}
    b = {"fingerprint": "bbbbbbbbbbbb"}
    status = [{"run": "x__seed1", "setting": "x", "seed": 1}, {"run": "y__seed1", "setting": "y", "seed": 1},
              {"run": "y__seed2", "setting": "y", "seed": 2}]
    same = {"x__seed1": _run(tmp_path, "1", a), "y__seed1": _run(tmp_path, "2", a)}
    assert code_versions_note(status, same) == []
    legacy = {"x__seed1": _run(tmp_path, "1", None), "y__seed1": _run(tmp_path, "2", None)}
    assert code_versions_note(status, legacy) == []              # all from before versions were kept
    mixed = {"x__seed1": _run(tmp_path, "1", a), "y__seed1": _run(tmp_path, "2", b, [a]),
             "y__seed2": _run(tmp_path, "3", None)}
    (note,) = code_versions_note(status, mixed)
    assert note.startswith("runs trained by 3 code versions")
    assert "aaaaaaaaaaaa: x seed 1, y seed 1" in note and "bbbbbbbbbbbb: y seed 1" in note
    assert "an unrecorded version: y seed 2" in note
    # commits that changed no computing file are one version; a job without .git is the same code
    one = {"x__seed1": _run(tmp_path, "1", {"fingerprint": "f" * 12, "git": "111"}),
           "y__seed1": _run(tmp_path, "2", {"fingerprint": "f" * 12, "git": "222"}),
           "y__seed2": _run(tmp_path, "3", {"fingerprint": "f" * 12, "git": None})}
    assert code_versions_note(status, one) == []
    one["y__seed2"] = _run(tmp_path, "3", {"fingerprint": "e" * 12, "git": None})
    (note,) = code_versions_note(status, one)
    assert f"{'f' * 12} (git 111, 222): x seed 1, y seed 1" in note and f"{'e' * 12}: y seed 2" in note
