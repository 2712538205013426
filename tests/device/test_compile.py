"""`train.compile`: the objective compiled by `apply_compile` (torch.compile, inductor) computes the
eager objective's loss terms and gradients on the CPU. Compiling takes about a minute on 2 cores.

Random draws are taken with torch's own generator in both (`fallback_random`), and dropout is off,
so the two differ by floating-point reordering only: loss terms within 1e-5 (relative), each
gradient within 1e-4 of its norm.
"""

from __future__ import annotations

import copy

import pytest
import torch

from device_tier import MAX_LEN, catalog, config, write_prepared
from hm4sr_dist.data import ShardReader
from hm4sr_dist.objective import build_objective
from hm4sr_dist.train.acceleration import apply_compile, placement_for


@pytest.mark.slow
def test_compiled_objective_matches_eager(tmp_path, monkeypatch):
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor, "fallback_random", True)
    cfg = config(**{"model.hidden_dropout": 0.0, "model.attn_dropout": 0.0, "train.compile": "true",
                    "data.length_widths": [8, MAX_LEN]})
    placement = placement_for(cfg, "cpu")
    prepared = write_prepared(tmp_path / "prepared")
    batches = [placement(b) for b, _ in zip(ShardReader(prepared, "train", 8, seed=2, max_len=MAX_LEN,
                                                        prefetch_batches=0), range(2))]
    eager = build_objective(cfg.model, cfg.loss, catalog())
    compiled = apply_compile(copy.deepcopy(eager))
    assert list(compiled.state_dict()) == list(eager.state_dict())     # checkpoints unchanged
    for batch in batches:
        results = []
        for objective in (eager, compiled):
            objective.zero_grad(set_to_none=True)
            torch.manual_seed(11)                       # the same PCL placeholders
            terms = objective(batch)
            terms.total.backward()
            results.append((terms.scalars(), {n: p.grad.clone() for n, p in objective.named_parameters()
                                              if p.grad is not None}))
        (loss_e, grad_e), (loss_c, grad_c) = results
        assert loss_c.keys() == loss_e.keys() == {"total", "main", "cp", "idcl", "pcl"}
        for name in loss_e:
            assert loss_c[name] == pytest.approx(loss_e[name], rel=1e-5), name
        assert grad_c.keys() == grad_e.keys()
        for name, g in grad_e.items():
            scale = float(g.norm()) or 1.0
            assert float((grad_c[name] - g).norm()) <= 1e-4 * scale, name
