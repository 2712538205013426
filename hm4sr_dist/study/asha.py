"""ASHA that really stops a trial whose trainable is a Ray Train run: its STOP becomes a stop request
that the Train workers honour between epochs (why and how: hm4sr_dist/train/stop.py)."""

from __future__ import annotations

from typing import Callable

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from hm4sr_dist.train.stop import request_stop


class GracefulASHA(ASHAScheduler):
    """ASHA whose STOP becomes a stop request to the trial's Train run (module docstring).

    `stop_file_of(trial_config)` names the marker of a trial (None: leave the STOP to Tune). It must
    pickle (a module-level function or a functools.partial of one): Tune saves its scheduler with
    the experiment. A result with `finished` (the final test report) is never turned into a request."""

    def __init__(self, stop_file_of: Callable[[dict], str | None], **asha):
        super().__init__(**asha)
        self.stop_file_of = stop_file_of
        self.requested: dict[str, dict] = {}              # Tune trial id -> the request written

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self.requested:
            # Stopping already: the epoch it is finishing must not enter ASHA's rungs as a survivor.
            return TrialScheduler.CONTINUE
        if result.get("from_run_folder"):
            # A finished run's stored result (a study re-run, or a Train run another study finished):
            # its best score at iteration 1 would raise the first rung's cut-off for every other trial.
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if action != TrialScheduler.STOP:
            return action
        if result.get("finished"):
            return TrialScheduler.CONTINUE                # the final report: the run has ended
        path = self.stop_file_of(trial.config)
        if path is None:
            return action
        why = {"by": "asha", "trial_id": trial.trial_id, "iteration": result.get(self._time_attr),
               "metric": self._metric, "value": result.get(self._metric)}
        request_stop(path, **why)
        self.requested[trial.trial_id] = why
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id in self.requested:
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)
