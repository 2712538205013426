"""A data error in a worker ends the run at once, as one line naming the shard (issue 25, finding 3).

A shard whose bytes do not match the manifest's sha256, an item ID or timestamp out of range, a tar
that cannot be read: the reader raises `ShardError` or `ManifestError`, and the same bytes fail the
same way on every attempt. Ray Train v2 retries any worker-group failure up to
`train.max_failures` times (minutes each, then a ~300-line `WorkerGroupError`), and its public
`FailureConfig` has no per-exception rule. So the launcher installs `DataErrorsAreFinal`, Ray
Train's default failure policy with one exception: a worker-group failure whose workers failed with
a data error is raised, not retried. Every other failure (a killed worker, an OOM, a preemption,
and a data read that failed on transient I/O, `transient_io`: a network reset, a storage timeout)
is retried as before. `raise_data_error` turns the raised `WorkerGroupError` into a
`ManifestError` with the data error's own message (one line in the jobs; the worker's traceback
is in its log).

The hook is the `create_failure_policy` that `ray.train.v2.api.data_parallel_trainer` calls in
`fit()` (an internal of Ray Train v2, checked by `tests/data/test_data_faults.py`): if a Ray
version moves it, `install` leaves Ray's default in place and says so, and data errors are retried
again, still ending in the same one-line error.
"""

from __future__ import annotations

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from hm4sr_dist.data.manifest import ManifestError
from hm4sr_dist.data.records import ShardError

DATA_ERRORS = (ShardError, ManifestError)


def data_error_of(failure: BaseException | None) -> BaseException | None:
    """The data error in a worker's failure (the exception itself, a RayTaskError wrapping it, or one
    in its cause chain), else None."""
    seen = set()
    while failure is not None and id(failure) not in seen:
        seen.add(id(failure))
        if isinstance(failure, DATA_ERRORS):
            # an I/O hiccup of the storage (a network reset) may pass: retried like any failure
            return None if getattr(failure, "transient", False) else failure
        cause = getattr(failure, "cause", None)          # RayTaskError keeps the user's exception here
        failure = cause if isinstance(cause, BaseException) else (failure.__cause__ or failure.__context__)
    return None


def worker_data_error(error: BaseException) -> BaseException | None:
    """The first data error among a `WorkerGroupError`'s worker failures (by rank), else None."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        found = data_error_of(failures[rank])
        if found is not None:
            return found
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def raise_data_error(error: BaseException) -> None:
    """Re-raise a Ray Train failure caused by a data error as a one-line ManifestError; return for
    any other failure (the caller re-raises it)."""
    found = worker_data_error(error)
    if found is not None:
        raise ManifestError(f"{_first_line(found)} (a data error: the run stopped without retrying it; "
                            "check the folder with hm4sr-prepare --verify DIR)") from None


class DataErrorsAreFinal(DefaultFailurePolicy):
    """Ray Train's default policy, except that a data error in a worker is raised at once."""

    def make_decision(self, training_failed_error):
        if isinstance(training_failed_error, WorkerGroupError) and worker_data_error(training_failed_error):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def create_failure_policy(failure_config):
    """What `DataParallelTrainer.fit()` calls for its failure policy, once `install` has run."""
    return DataErrorsAreFinal(failure_config)


def install() -> bool:
    """Make Ray Train v2's `fit()` build `DataErrorsAreFinal`; False (Ray's default kept) when this
    Ray has no such hook."""
    from ray.train.v2.api import data_parallel_trainer

    if not hasattr(data_parallel_trainer, "create_failure_policy"):
        print("note: this Ray Train has no failure-policy hook; data errors are retried "
              "train.max_failures times before they stop the run", flush=True)
        return False
    data_parallel_trainer.create_failure_policy = create_failure_policy
    return True
