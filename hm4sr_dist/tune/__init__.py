"""Ray Tune sweeps over the paper's hyper-parameter grids (spec §3, Fig. 4).

`space` builds the search spaces (no Ray), `trial` is the Tune trainable (one TorchTrainer fit per
trial, Train V2 + TuneReportCallback), `sweep` runs a Tuner and writes sweep_results.json,
`resources` refuses a trial that cannot fit the cluster's CPUs (sweeps and studies), `stop` and
`asha` stop a trial's Train run cleanly between epochs (a study's --asha).
"""

from hm4sr_dist.tune.space import (FIG4_PARAMS, PAPER_GRID, PAPER_KEYS, fig4_trials, grid_size,
                                   grid_space, grid_trials, resolve_param, trial_run_name)

__all__ = ["FIG4_PARAMS", "PAPER_GRID", "PAPER_KEYS", "fig4_trials", "grid_size", "grid_space",
           "grid_trials", "resolve_param", "trial_run_name", "run_sweep"]


def __getattr__(name):          # run_sweep imports Ray; keep `import hm4sr_dist.tune` light
    if name == "run_sweep":
        from hm4sr_dist.tune.sweep import run_sweep
        return run_sweep
    raise AttributeError(name)
