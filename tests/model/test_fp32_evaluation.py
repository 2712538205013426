"""Evaluation runs in fp32 whatever the training precision (a bf16 model is evaluated on an fp32
copy of its weights), so ranks and ties do not depend on how the model was trained."""

import copy

import torch

from hm4sr_dist.train.evaluation import distributed_metrics, fp32_model
from hm4sr_tiny import make_model, tiny_batch


def test_a_bf16_model_is_evaluated_on_an_fp32_copy_and_left_as_it_is():
    model = make_model().eval()
    bf16 = copy.deepcopy(model)
    for p in bf16.parameters():                      # what a bf16 engine holds: half parameters
        p.data = p.data.to(torch.bfloat16)
    copy32 = fp32_model(bf16)
    assert copy32 is not bf16 and next(bf16.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in copy32.parameters())
    assert fp32_model(model) is model                                  # fp32 already: no copy
    batch = tiny_batch()
    weight = torch.ones(len(batch.target))
    got, _ = distributed_metrics(bf16, [(batch, weight)], [1, 5])
    expected, _ = distributed_metrics(copy32, [(batch, weight)], [1, 5])
    assert got == expected
    # float64 buffers keep their precision (eq. 13's frequencies)
    assert copy32.time_embedding.freq_scales.dtype == torch.float64
