"""benchmarks/gpu_acceptance.py end to end in its CPU mode (`--cpu-smoke`), so the script a GPU box
runs cannot rot: every section (the `-m gpu` tests, which skip here; epochs with the production
reader, loop and step; the 1024 x 50-style step; the catalogue losses) runs and reports.
Eager only (`--compiled` with no precision): compiling is `apply_compile`, which
test_compile.py checks, and would add a minute per graph here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from device_tier import write_prepared

ROOT = Path(__file__).resolve().parents[2]


def test_acceptance_script_runs_every_section_in_cpu_mode(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    out = tmp_path / "acceptance.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--cpu-smoke",
                           "--compiled", "--prepared-dir", str(prepared), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    sections = {r["section"] for r in rows}
    assert sections == {"tests", "epochs", "step", "catalog"}
    tests = next(r for r in rows if r["section"] == "tests")
    assert tests["rc"] == 0 and "skipped" in tests["summary"]             # -m gpu: skipped with a reason
    epochs = [r for r in rows if r["section"] == "epochs"]
    assert {(r["model"], r["mode"]) for r in epochs} == {("sasrec", "eager"), ("hm4sr", "eager")}
    for r in epochs:
        assert r["sequences_per_s"] > 0 and r["s_per_epoch"] > 0 and 0 <= r["data_wait"] < 1
        assert r["tflops"] > 0 and r["valid"] is not None
    steps = [r for r in rows if r["section"] == "step"]
    assert {r["model"] for r in steps} == {"hm4sr", "sasrec"} and all(r["flops_per_step"] > 0 for r in steps)
    catalog = {(r["model"], r["items"], r["mode"]) for r in rows if r["section"] == "catalog"}
    assert ("hm4sr", 10_000, "sampled") in catalog and ("sasrec", 1_000, "full") in catalog
    assert "section  model" in done.stdout                                 # the printed table
