"""What a study trial forwards to Tune: the Ray Train reports of worker rank 0, through
`ray.tune.integration.ray_train.TuneReportCallback` in the trial's `RunConfig(callbacks=...)`
(the Train V2 pattern; passing a trainer straight to `Tuner` is Train V1's deprecated path).

Tune sees each epoch's metrics with `best_valid`, then the final test metrics, so it holds the whole
training curve and the last result holds `best_valid` and `test/*`.

One trap, guarded here: Tune reserves some result keys (ray.tune.result.DONE and others). A result
with `done` ends the trial at once, the Tune trial actor is killed while the Train controller it
owns is still shutting down, the worker group's placement group is never removed, and on a small
cluster the next trial's workers wait for CPUs that never free up. The worker therefore marks its
final report `finished`, and any reserved key a user's metric might still carry is forwarded under
a `train_` prefix (`train_done`). A scheduler's STOP has the same effect on a running Train run;
the study's `--asha` uses `hm4sr_dist.study.asha.GracefulASHA`, which asks the Train run to stop
between epochs instead (hm4sr_dist/train/stop.py).
"""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import DONE, SHOULD_CHECKPOINT, TRIAL_ID

TUNE_RESERVED = (DONE, SHOULD_CHECKPOINT, TRIAL_ID)


class HM4SRTuneReportCallback(TuneReportCallback):
    """`TuneReportCallback` that forwards Tune-reserved metric names as `train_<name>`, and only the
    per-epoch and final reports: a mid-epoch step checkpoint's report carries no validation metric
    for Tune's schedulers (the Train run inside the trial keeps and resumes those checkpoints).

    With `valid_key` (`valid/<eval.valid_metric>`), the final (test) report also carries it, set to
    `best_valid` (the validation score of the epoch whose weights were tested): Tune checks that
    every result holds the scheduler's metric, and only the per-epoch reports have it (--asha)."""

    def __init__(self, valid_key: str | None = None):
        super().__init__()
        self.valid_key = valid_key

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0].get("checkpoint_kind") == "step":
            return
        renamed = [{(f"train_{k}" if k in TUNE_RESERVED else k): v for k, v in m.items()} for m in metrics]
        if self.valid_key:
            renamed = [m if self.valid_key in m or "best_valid" not in m else {**m, self.valid_key: m["best_valid"]}
                       for m in renamed]
        super().after_report(run_context, renamed, checkpoint)
