"""Will a Tune trial that runs a Ray Train run fit the cluster? One check for studies and sweeps.

A trial reserves `trial_cpus` for its driver function (the Tune trial actor, which only drives the
Train controller) and its Train run then asks for `train.num_workers` x `train.cpus_per_worker`
more. If the two together exceed the cluster's CPUs, Tune starts the trial and the worker group
waits for CPUs that never free up: the study or sweep hangs at worker-group startup (on 2 CPUs:
1 + 2 workers x 1 CPU). Refused before the first trial, naming the fix.

`--max-concurrent` trials only run at once if all their worker groups fit too. Otherwise the extra
trial's driver holds its CPUs while its worker group waits, and Ray Train logs a worker-group
startup timeout every minute until another trial ends (hundreds of error blocks in a long study).
`fit_concurrency` lowers the limit to what fits and says so.
"""

from __future__ import annotations

import math
from typing import Iterable

from hm4sr_dist.config import ConfigError

FIX = ("use --trial-cpus 0.5 with train.num_workers=1, or a Ray started with more CPUs "
       "(ray start --head --num-cpus N; RAY_ADDRESS=auto)")


def check_trials_fit(worker_shapes: Iterable[tuple[int, float]], trial_cpus: float,
                     cluster: dict | None = None) -> None:
    """`worker_shapes`: (train.num_workers, train.cpus_per_worker) of each trial; `cluster`: Ray's
    cluster resources (default `ray.cluster_resources()`). Raises ConfigError (one line) when the
    largest trial does not fit. A GPU cluster is not checked (its workers wait for GPUs, which
    Tune does not reserve either, and CPUs are rarely the limit there)."""
    if cluster is None:
        import ray
        cluster = ray.cluster_resources()
    have = cluster.get("CPU", 0)
    need = max(trial_cpus + n * c for n, c in worker_shapes)
    if need > have and not cluster.get("GPU", 0):
        raise ConfigError(key="--trial-cpus", expected=f"a trial's driver plus its workers to fit the "
                          f"cluster's {have:g} CPUs", got=f"{trial_cpus:g} + workers = {need:g} CPUs",
                          why=FIX)


def fit_concurrency(max_concurrent: int, worker_shapes: Iterable[tuple[int, float]], trial_cpus: float,
                    cluster: dict | None = None) -> tuple[int, str | None]:
    """(trials to run at once, a note when that is fewer than `max_concurrent`), after
    `check_trials_fit` (one trial must fit at all). The largest trial's driver plus workers sets
    how many fit the cluster's CPUs together; GPU clusters are not capped."""
    worker_shapes = list(worker_shapes)
    if cluster is None:
        import ray
        cluster = ray.cluster_resources()
    check_trials_fit(worker_shapes, trial_cpus, cluster)
    have = cluster.get("CPU", 0)
    need = max(trial_cpus + n * c for n, c in worker_shapes)
    if cluster.get("GPU", 0) or need <= 0:
        return max_concurrent, None
    fits = max(1, math.floor(have / need + 1e-9))
    if max_concurrent <= fits:
        return max_concurrent, None
    return fits, (f"--max-concurrent {max_concurrent} lowered to {fits}: a trial needs {need:g} CPUs "
                  f"(its driver {trial_cpus:g} + its workers) and the cluster has {have:g}")
