"""The on-disk format (`records`, `manifest`) imports without torch and without the model: every
Ray Data task of the preparation imports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_after(statement: str, check: str) -> None:
    code = f"{statement}; import sys; {check}"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_format_modules_import_without_torch_or_the_model():
    imported_after("import hm4sr_dist.data.records, hm4sr_dist.data.manifest",
                   "assert 'torch' not in sys.modules, 'torch'; "
                   "assert not any(m.startswith('hm4sr_dist.model') for m in sys.modules), 'model'")


def test_pipeline_modules_load_only_the_format_from_hm4sr_dist():
    allowed = {"hm4sr_dist", "hm4sr_dist.data", "hm4sr_dist.data.records", "hm4sr_dist.data.manifest"}
    imported_after("import data_pipelines.shards, data_pipelines.preprocess, data_pipelines.prepare",
                   f"extra = {{m for m in sys.modules if m.startswith('hm4sr_dist')}} - {allowed!r}; "
                   "assert not extra, sorted(extra)")


def test_package_names_still_resolve():
    from hm4sr_dist import data

    assert data.ShardReader.__module__ == "hm4sr_dist.data.reader"
    assert data.read_manifest.__module__ == "hm4sr_dist.data.manifest"
    assert set(data.__all__) <= set(dir(data))
