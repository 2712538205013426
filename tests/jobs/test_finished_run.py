"""A finished run is read-only (issue 25, finding 6): re-running the job prints its stored results
without starting Ray Train, without a new checkpoint, without touching results.json, TensorBoard or
the MLflow run. Before, a re-run started two workers, evaluated the test set again, wrote a
checkpoint, overwrote wall_seconds and appended to resumed_at_steps."""

import json
from pathlib import Path

import pytest

from hm4sr_test_utils import mlflow_runs
from jobs.common import DatasetJob, run_job

pytestmark = pytest.mark.slow
TINY = ["model.hidden_size=8", "model.inner_size=16", "model.max_seq_len=12", "model.n_layers=1",
        "optim.batch_size=64", "optim.epochs=1", "train.num_workers=1", "eval.batch_size=256"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_read_not_run_again(prepared_sequences, local_ray, tmp_path, monkeypatch, capsys):
    from hm4sr_dist.train import launcher

    job = DatasetJob("seq", "sequence")
    storage, out = tmp_path / "storage", tmp_path / "out"
    argv = ["--prepared-dir", str(prepared_sequences), "--output", str(out), *TINY,
            f"train.storage_path={storage}"]
    first = run_job(job, argv)
    before = snapshot(storage) | {f"out/{k}": v for k, v in snapshot(out).items()}
    results_bytes = (out / "results.json").read_bytes()

    def no_training(cfg):
        raise AssertionError("a finished run started Ray Train again")

    monkeypatch.setattr(launcher, "run_training", no_training)
    capsys.readouterr()
    again = run_job(job, argv)
    printed = capsys.readouterr().out
    assert "is finished (nothing to train at optim.epochs=1): its results, unchanged" in printed
    assert again == json.loads(results_bytes) and (out / "results.json").read_bytes() == results_bytes
    after = snapshot(storage) | {f"out/{k}": v for k, v in snapshot(out).items()}
    assert after == before                       # no checkpoint, TensorBoard event or MLflow write
    # another --output folder: written from the run's final checkpoint, still without training
    elsewhere = run_job(job, argv[:3] + [str(tmp_path / "elsewhere")] + argv[4:])
    assert elsewhere["test"] == first["test"] and elsewhere["read_from_finished_run"] is True
    assert snapshot(storage) == {k: v for k, v in before.items() if not k.startswith("out/")}
    # a results.json of an earlier checkpoint of the same Train run (trained further since, by a
    # study trial or a higher epoch cap) is not its result: rewritten from the final checkpoint
    older = json.loads(results_bytes) | {"checkpoint": "storage/older/checkpoint_0", "test": {"ndcg@10": 0.0}}
    (out / "results.json").write_text(json.dumps(older))
    capsys.readouterr()
    current = run_job(job, argv)
    assert "wrote" in capsys.readouterr().out and current["test"] == first["test"]
    assert current["checkpoint"] == first["checkpoint"]
    _, [run] = mlflow_runs(storage / "mlflow.db", f"hm4sr-{first['dataset']}")
    assert run.info.status == "FINISHED" and run.data.tags["hm4sr.identity"] == first["identity"]
