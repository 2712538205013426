"""Where dropout sits (eq. 17-18; docs/model.md "Transformer": RecBole's post-LayerNorm layers with
attention and hidden dropout). RecBole's SASRec and layers put dropout at:

    S' = Dropout(LayerNorm(S))                              eq. 17 ("input"; for SASRec S = item + position)
    probs = Dropout_attn(softmax(q k^T / sqrt(d_h)))        inside attention ("attn_probs{n}")
    x = LayerNorm(x + Dropout(W_O context + b_O))           after the attention output ("attn_out{n}")
    x = LayerNorm(x + Dropout(FFN(x)))                      after the feed-forward ("ffn_out{n}")

and nowhere else (not on the item vectors, the MoEs, the CP head or inside the FFN). The reference is
`hm4sr_tiny.reference_encoder`, a hand-written post-LN Transformer whose `drop` marks those sites.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.feasibility import with_variant
from hm4sr_dist.model import HM4SR
from hm4sr_dist.model import dropout as fast_dropout
from hm4sr_tiny import (D, L, make_model, randomize_, ref_layer_norm, reference_encoder, reference_forward,
                        tiny_batch, tiny_catalog, tiny_model_cfg)

N_LAYERS = 2
HIDDEN_SITES = ["input"] + [f"{site}{k}" for k in range(N_LAYERS) for site in ("attn_out", "ffn_out")]


def _params(model):
    return {name: p.detach().double() for name, p in model.named_parameters()}


def _zero_at(*sites):
    return lambda site, x: torch.zeros_like(x) if site in sites else x


class DropoutSpy:
    """Stands in for F.dropout: records (p, training, input) of every call and returns its input,
    except at call number `zero_call`, whose output is zeros (that one site dropped with p = 1)."""

    def __init__(self, zero_call: int | None = None):
        self.calls, self.zero_call = [], zero_call

    def __call__(self, x, p=0.5, training=True, inplace=False):
        self.calls.append((p, training, x.detach().clone()))
        return torch.zeros_like(x) if len(self.calls) - 1 == self.zero_call else x


def _spy_on_dropout(monkeypatch, spy):
    """The encoders' dropouts all go through hm4sr_dist.model.dropout.dropout (rand mask on the CPU,
    F.dropout elsewhere); F.dropout is replaced too, so a dropout anywhere else is counted as well."""
    monkeypatch.setattr(fast_dropout, "dropout", spy)
    monkeypatch.setattr(F, "dropout", spy)


@pytest.mark.parametrize("zeroed", range(len(HIDDEN_SITES)))
def test_each_hidden_dropout_site_of_the_encoder(monkeypatch, zeroed):
    """Eq. 17-18: the encoder calls hidden dropout exactly 1 + 2 * n_layers times, with
    p = hidden_dropout, in the order input, attn_out0, ffn_out0, attn_out1, ffn_out1; dropping the
    k-th call alone gives the reference with exactly that site dropped."""
    cfg = tiny_model_cfg(hidden_dropout=0.3, attn_dropout=0.0, n_layers=N_LAYERS)
    model = make_model(cfg).train()
    encoder = model.encoders["text"]
    seq, seq_len = torch.randn(5, L, D), torch.tensor([7, 3, 1, 5, 2])
    spy = DropoutSpy(zero_call=zeroed)
    _spy_on_dropout(monkeypatch, spy)
    got = encoder(seq, seq_len)
    expected_calls = [(0.3, True, (5, L, D))] * len(HIDDEN_SITES)
    assert [(p, training, x.shape) for p, training, x in spy.calls] == expected_calls
    expected = reference_encoder(_params(model), "encoders.text", cfg, seq.double(), seq_len,
                                 drop=_zero_at(HIDDEN_SITES[zeroed]))
    assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # the site matters: without the drop the output is different
    intact = reference_encoder(_params(model), "encoders.text", cfg, seq.double(), seq_len)
    assert (expected - intact).abs().amax() > 1e-3


def test_attention_dropout_is_on_the_attention_probabilities():
    """Eq. 18, attention dropout (RecBole's attn_dropout on attention_probs): with attn_dropout = 1
    every probability is dropped, so each attention sub-layer outputs only its out-projection bias
    (not 0, which dropping the sub-layer output would give); in eval mode nothing is dropped."""
    cfg = tiny_model_cfg(hidden_dropout=0.0, attn_dropout=1.0, n_layers=N_LAYERS)
    model = make_model(cfg).train()
    encoder, params = model.encoders["image"], _params(model)
    seq, seq_len = torch.randn(5, L, D), torch.tensor([7, 3, 1, 5, 2])
    got = encoder(seq, seq_len).double()

    def ref(drop):
        return reference_encoder(params, "encoders.image", cfg, seq.double(), seq_len, drop)

    probs_dropped = ref(_zero_at(*[f"attn_probs{k}" for k in range(N_LAYERS)]))
    assert_close(got, probs_dropped, rtol=1e-5, atol=1e-6)
    assert (probs_dropped - ref(_zero_at(*[f"attn_out{k}" for k in range(N_LAYERS)]))).abs().amax() > 1e-3
    model.eval()
    assert_close(encoder(seq, seq_len).double(), ref(_zero_at()), rtol=1e-5, atol=1e-6)


def _model(variant: str, cfg) -> HM4SR:
    exp = ExperimentConfig()
    exp.model = cfg
    exp = with_variant(exp, variant)
    torch.manual_seed(0)
    model = HM4SR(exp.model, tiny_catalog(), category_head=exp.loss.cp_weight > 0,
                  pcl_ratio=exp.loss.pcl_ratio if exp.loss.pcl_weight > 0 else None)
    randomize_(model)
    if model.temporal_moe is not None:
        with torch.no_grad():
            model.temporal_moe.expert_weight.add_(1.0)
    return model


@pytest.mark.parametrize("variant", ["hm4sr", "sasrec"])
def test_first_dropout_of_each_stream_reads_layernorm_of_its_sequence(monkeypatch, variant):
    """Eq. 17 in the whole model: the only dropouts are the encoders' (1 + 2 n_layers per stream,
    the PCL streams included), and each stream's first one reads LayerNorm(S_m), S_m from the
    reference (eq. 6-16). For `sasrec` that is LayerNorm(x_id + p), as in RecBole's SASRec."""
    cfg = tiny_model_cfg(hidden_dropout=0.2, attn_dropout=0.0, n_layers=N_LAYERS)
    model = _model(variant, cfg).train()
    batch = tiny_batch()
    spy = DropoutSpy()
    _spy_on_dropout(monkeypatch, spy)
    out = model(batch, augment=True)
    ref = reference_forward(model, tiny_catalog(), batch)
    per_stream = 1 + 2 * N_LAYERS
    streams = list(model.modalities) + list(out.pcl_repr)
    assert len(spy.calls) == per_stream * len(streams)
    assert all(p == 0.2 and training for p, training, _ in spy.calls)
    params = _params(model)
    for i, m in enumerate(model.modalities):
        if variant == "sasrec":
            s = params["items.id_table.weight"][batch.item_seq] + params["position.weight"][:L]
        else:
            s = ref["S"][m]
        expected = ref_layer_norm(s, params[f"encoders.{m}.norm.weight"], params[f"encoders.{m}.norm.bias"],
                                  cfg.layer_norm_eps)
        assert_close(spy.calls[i * per_stream][2].double(), expected, rtol=1e-5, atol=1e-6)


def test_hidden_dropout_one_leaves_nothing_of_the_input_and_touches_nothing_before_the_encoders():
    """Eq. 17-18 with hidden_dropout = 1 (training): S' = 0 and both sub-layer outputs are dropped,
    so every H^m (and PCL view) is the same constant, the reference on an all-dropped input; the
    gates (eq. 9, 14) and the CP logits (eq. 21) are those of eval mode: no dropout before eq. 17."""
    cfg = tiny_model_cfg(hidden_dropout=1.0, attn_dropout=0.0, n_layers=N_LAYERS)
    model = make_model(cfg).train()
    batch, catalog = tiny_batch(), tiny_catalog()
    out = model(batch, augment=True, categories=True)
    ref = reference_forward(model, catalog, batch)
    params, real = _params(model), batch.padding_mask()
    for i, m in enumerate(model.modalities):
        constant = reference_encoder(params, f"encoders.{m}", cfg, torch.randn(len(batch), L, D).double(),
                                     batch.seq_len, drop=_zero_at(*HIDDEN_SITES))
        assert (constant - constant[0]).abs().amax() < 1e-9              # the input is gone
        assert_close(out.seq_repr[:, i * D:(i + 1) * D].double(), constant, rtol=1e-5, atol=1e-6)
        if m in out.pcl_repr:
            assert_close(out.pcl_repr[m].double(), constant, rtol=1e-5, atol=1e-6)
    assert_close(out.interactive_gates.double()[real], ref["interactive_gates"][real], rtol=1e-5, atol=1e-6)
    assert_close(out.temporal_gates.double()[real], ref["temporal_gates"][real], rtol=1e-5, atol=1e-6)
    assert_close(out.cp_logits.double()[real], ref["cp_logits"], rtol=1e-5, atol=1e-6)
