"""The assembled model: eq. 2-19 and 24 against `hm4sr_tiny.reference_forward` (the equations
written out in float64 from the model's parameters, no sub-module called), eq. 6 (one shared
position table), eq. 19 (scores), eq. 21 (CP logits), eq. 24 (PCL placeholders), padding invariance,
the ablation switches and single-modality models."""

from fractions import Fraction

import pytest
import torch
from torch.testing import assert_close

from hm4sr_dist.batch import Batch
from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.feasibility import with_variant
from hm4sr_dist.model import HM4SR, placeholder_mask
from hm4sr_dist.objective import build_objective
from hm4sr_tiny import (D, L, N_ITEMS, make_model, reference_forward, tiny_batch, tiny_catalog,
                        tiny_model_cfg)

MODS = ["id", "text", "image"]


def _record(module, store, key):
    return module.register_forward_hook(lambda mod, args, out: store.setdefault(key, []).append((args, out)))


# -- eq. 2-19 against the equations written out from the parameters ---------------------------

def _ref64(t):
    return t.detach().double()


@pytest.mark.parametrize("overrides", [
    {},                                                                  # the paper's three modalities
    {"modalities": ["image", "id"], "n_interactive_experts": 2, "n_heads": 1},   # order follows cfg
    {"modalities": ["text"], "n_layers": 1, "n_temporal_experts": 5, "n_heads": 4},
])
def test_forward_matches_equations_2_to_19_and_24_written_out(overrides):
    """Eq. 2-19 (and the PCL view of eq. 24): items, shared positions, Interactive MoE, time
    embedding, Temporal MoE, post-LN causal Transformers and scores, recomputed in float64 from the
    model's parameters by `hm4sr_tiny.reference_forward` (no sub-module of the model is called)."""
    cfg = tiny_model_cfg(**overrides)
    mods = list(cfg.modalities)
    batch, catalog = tiny_batch(), tiny_catalog()
    model = make_model(cfg)                                              # eval: dropout off
    real = batch.padding_mask()
    torch.manual_seed(7)                                                 # the placeholder draw of eq. 24
    mask = placeholder_mask(real, batch.seq_len, model.pcl_ratio)
    torch.manual_seed(7)
    out = model(batch, augment=True)
    ref = reference_forward(model, catalog, batch, placeholder=mask)
    assert mask.any()
    tol = dict(rtol=1e-5, atol=1e-6)
    assert_close(_ref64(out.item_repr), torch.cat([ref["x"][m] for m in mods], -1), **tol)      # eq. 2-5
    assert_close(_ref64(out.interactive_gates)[real], ref["interactive_gates"][real], **tol)    # eq. 9
    assert_close(_ref64(out.temporal_gates)[real], ref["temporal_gates"][real], **tol)         # eq. 14
    assert_close(_ref64(out.seq_repr), torch.cat([ref["H"][m] for m in mods], -1), **tol)      # eq. 18
    scores = _ref64(model.scores(out.seq_repr, out.item_repr))
    assert torch.isneginf(scores[:, 0]).all() and torch.isneginf(ref["scores"][:, 0]).all()
    assert_close(scores[:, 1:], ref["scores"][:, 1:], rtol=1e-5, atol=1e-5)                    # eq. 19
    content = [m for m in mods if m != "id"]
    assert set(out.pcl_repr) == set(content)
    for m in content:
        assert_close(_ref64(out.pcl_repr[m]), ref["H_aug"][m], **tol)                          # eq. 24
    assert torch.equal(out.real, real)
    assert out.cp_logits is None                                         # only when asked for


def test_one_position_table_is_added_to_every_modality():
    """Eq. 6: e_m = x_m + p with ONE position table shared by the modalities; what the Interactive
    MoE receives is the reference's e_m."""
    batch, catalog = tiny_batch(), tiny_catalog()
    model = make_model()
    seen = {}
    handle = _record(model.interactive_moe, seen, "imoe")
    model(batch)
    handle.remove()
    e = seen["imoe"][0][0][0]                                             # (B, L, M, d) input of eq. 7
    ref = reference_forward(model, catalog, batch)
    for i, m in enumerate(MODS):
        assert_close(_ref64(e[:, :, i]), ref["e"][m], rtol=1e-6, atol=1e-6)
    assert model.position.weight.shape == (L, D)
    assert not any("position" in n and n != "position.weight" for n, _ in model.named_parameters())


def test_cp_logits_are_the_head_on_real_items():
    """Eq. 21: one CP logit row W_CP [x_id; x_txt; x_img] + b_CP per input position (CP reads the
    real ones through the mask `out.real`), in train and eval mode alike when the objective asks."""
    batch = tiny_batch()
    model = make_model(tiny_model_cfg(hidden_dropout=0.0, attn_dropout=0.0)).train()
    out = model(batch, categories=True)
    assert_close(model.eval()(batch, categories=True).cp_logits, out.cp_logits, rtol=0, atol=0)
    real = batch.padding_mask()
    assert torch.equal(out.real, real)
    assert torch.equal(out.cp_items, batch.item_seq)
    ref = reference_forward(model, tiny_catalog(), batch)["cp_logits"]
    assert out.cp_logits.shape == real.shape + (ref.shape[1],)
    assert_close(_ref64(out.cp_logits[real]), ref, rtol=1e-5, atol=1e-6)


# -- eq. 19 -------------------------------------------------------------------------------------

def test_scores_are_the_sum_of_per_modality_dot_products():
    """Eq. 19 item by item: y_v = sum_m H^m . x_m(v), x_m from the catalogue's frozen features
    (eq. 4-5); the padding item scores -inf."""
    batch, catalog = tiny_batch(), tiny_catalog()
    model = make_model()
    out = model(batch)
    scores = model.scores(out.seq_repr, out.item_repr)
    assert scores.shape == (len(batch), N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all()
    x = {"id": model.items.id_table.weight}
    for m, f in (("text", catalog.text_features), ("image", catalog.image_features)):
        x[m] = f @ model.items.projections[m].weight.T + model.items.projections[m].bias   # eq. 4-5
    expected = torch.zeros(len(batch), N_ITEMS + 1, dtype=torch.float64)
    for i, m in enumerate(MODS):
        h_m = out.seq_repr[:, i * D:(i + 1) * D].double()
        for v in range(1, N_ITEMS + 1):
            expected[:, v] += (h_m * x[m][v].double()).sum(-1)
    assert_close(scores[:, 1:].double(), expected[:, 1:], rtol=1e-5, atol=1e-5)


# -- eq. 24 -------------------------------------------------------------------------------------

def _expected_count(ratio: float, n: int) -> int:
    return int(Fraction(str(ratio)) * n)       # exact decimal arithmetic: floor(0.3 * 10) = 3


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 1.0, 0.0])
def test_placeholder_mask_counts_and_never_padding(ratio):
    """Eq. 24: floor(beta len) distinct real positions per row, never padding, random but seedable."""
    seq_len = torch.tensor([10, 9, 7, 3, 1, 2, 5])
    real = torch.arange(10).unsqueeze(0) < seq_len.unsqueeze(1)
    expected = torch.tensor([_expected_count(ratio, n) for n in seq_len.tolist()])
    hits = torch.zeros(real.shape)
    for seed in range(200):
        mask = placeholder_mask(real, seq_len, ratio, torch.Generator().manual_seed(seed))
        assert torch.equal(mask.sum(1), expected)
        assert not (mask & ~real).any()
        hits += mask
    # every real position of a row with a non-zero count is chosen sometimes (random, not fixed)
    rows = expected > 0
    assert (hits[rows][real[rows]] > 0).all() or ratio == 0.0
    m1 = placeholder_mask(real, seq_len, ratio, torch.Generator().manual_seed(5))
    m2 = placeholder_mask(real, seq_len, ratio, torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2)


@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_pcl_view_replaces_exactly_the_masked_positions(beta):
    """Eq. 24: exactly the floor(beta len) drawn real positions of the text and image streams are
    replaced, by W_{P,m} [r_1; r_2] + b_{P,m} (r from the reference time embedding, eq. 11-13)."""
    batch = tiny_batch()
    model = make_model(pcl_ratio=beta)
    seen = {}
    hooks = [_record(model.encoders[m], seen, m) for m in ("text", "image")]
    real = batch.padding_mask()
    torch.manual_seed(7)
    expected_mask = placeholder_mask(real, batch.seq_len, beta)
    torch.manual_seed(7)
    out = model(batch, augment=True)
    for h in hooks:
        h.remove()
    counts = torch.tensor([_expected_count(beta, n) for n in batch.seq_len.tolist()])
    assert torch.equal(expected_mask.sum(1), counts) and not (expected_mask & ~real).any()
    time = reference_forward(model, tiny_catalog(), batch)["time"].float()   # [r_1; r_2], (B, L, 2d)
    assert set(out.pcl_repr) == {"text", "image"}
    for i, m in ((1, "text"), (2, "image")):
        (orig, seq_len), h_m = seen[m][0]
        (aug, seq_len2), h_aug = seen[m][1]
        assert torch.equal(seq_len, batch.seq_len) and torch.equal(seq_len2, batch.seq_len)
        changed = (aug != orig).any(-1)
        assert torch.equal(changed, expected_mask)                         # exactly those, never padding
        w, b = model.placeholders[m].weight, model.placeholders[m].bias    # W_{P,m} (d x 2d), b_{P,m}
        assert w.shape == (D, 2 * D)
        assert_close(aug[changed], time[changed] @ w.T + b, rtol=1e-5, atol=1e-6)     # eq. 24
        assert_close(out.pcl_repr[m], h_aug, rtol=0, atol=0)
        assert_close(out.seq_repr[:, i * D:(i + 1) * D], h_m, rtol=0, atol=0)
        untouched = counts == 0                                            # floor(beta * len) = 0
        assert_close(out.pcl_repr[m][untouched], h_m[untouched], rtol=0, atol=0)
        assert ((out.pcl_repr[m][~untouched] - h_m[~untouched]).abs().amax(1) > 1e-5).all()


def test_no_pcl_view_without_augment_or_without_ratio():
    """Eq. 24: the PCL view exists only when asked for (augment) and built (pcl_ratio)."""
    batch = tiny_batch()
    assert make_model()(batch).pcl_repr == {}
    model = make_model(pcl_ratio=None)
    assert len(model.placeholders) == 0 and model(batch, augment=True).pcl_repr == {}


# -- padding ------------------------------------------------------------------------------------

def _garbage_in_padding(batch: Batch, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    real = batch.padding_mask()
    items = torch.where(real, batch.item_seq, torch.randint(0, N_ITEMS + 1, real.shape, generator=g))
    times = torch.where(real, batch.time_seq, torch.randint(-4 * 10**9, 4 * 10**9, real.shape, generator=g))
    return Batch(items, times, batch.seq_len, batch.target)


@pytest.mark.parametrize("kind", ["interval_absolute", "interval", "absolute", "day", "day_of_year",
                                  "cos_interval"])
def test_padded_slots_never_change_real_outputs(kind):
    """Batch contract: garbage items and timestamps in padded slots change no real output
    (eq. 11-18 with every Fig. 5 time embedding)."""
    batch = tiny_batch()
    model = make_model(tiny_model_cfg(time_embedding=kind))
    torch.manual_seed(3)
    base = model(batch, augment=True)
    for seed in range(3):
        torch.manual_seed(3)
        other = model(_garbage_in_padding(batch, seed), augment=True)
        assert_close(other.seq_repr, base.seq_repr, rtol=0, atol=1e-6)
        for m in ("text", "image"):
            assert_close(other.pcl_repr[m], base.pcl_repr[m], rtol=0, atol=1e-6)
        real = batch.padding_mask()
        assert_close(other.temporal_gates[real], base.temporal_gates[real], rtol=0, atol=1e-6)


def test_extra_padding_columns_and_trimming_change_nothing():
    """Batch contract: trimming or adding padding columns changes no output (eq. 17-21)."""
    batch = tiny_batch()
    model = make_model(tiny_model_cfg(max_seq_len=10, hidden_dropout=0.0, attn_dropout=0.0)).train()
    rows = batch.seq_len < L                                          # longest real length 5 of 7 columns
    short = Batch(batch.item_seq[rows], batch.time_seq[rows], batch.seq_len[rows], batch.target[rows])
    trimmed = short.trimmed()
    assert trimmed.item_seq.shape[1] == int(short.seq_len.max()) == 5
    assert batch.trimmed() is batch                                   # nothing to trim
    pad3 = lambda t: torch.nn.functional.pad(t, (0, 3))                      # noqa: E731
    padded = Batch(pad3(short.item_seq), pad3(short.time_seq),
                   short.seq_len, short.target)                       # 10 columns
    outs = [model(b, categories=True) for b in (trimmed, short, padded)]
    for o in outs[1:]:
        assert_close(o.seq_repr, outs[0].seq_repr, rtol=0, atol=1e-6)
        assert_close(model.scores(o.seq_repr, o.item_repr), model.scores(outs[0].seq_repr, outs[0].item_repr),
                     rtol=0, atol=1e-5)
        n = outs[0].real.shape[1]
        assert_close(o.cp_logits[:, :n][outs[0].real], outs[0].cp_logits[outs[0].real], rtol=0, atol=0)
        assert torch.equal(o.cp_items[:, :n][outs[0].real], outs[0].cp_items[outs[0].real])
        assert_close(o.temporal_gates[:, :n][outs[0].real], outs[0].temporal_gates[outs[0].real],
                     rtol=0, atol=1e-6)
        assert_close(o.interactive_gates[:, :n][outs[0].real], outs[0].interactive_gates[outs[0].real],
                     rtol=0, atol=1e-6)


# -- ablation switches --------------------------------------------------------------------------

def _variant_model(catalog, variant: str, seed: int = 0) -> HM4SR:
    """The production build path (build_objective) for a variant of the tiny config."""
    cfg = ExperimentConfig()
    cfg.model = tiny_model_cfg()
    cfg = with_variant(cfg, variant)
    torch.manual_seed(seed)
    return build_objective(cfg.model, cfg.loss, catalog).model.eval()


REMOVED = {
    "hm4sr": set(),
    "-IMoE": {"interactive_moe."},
    "-TMoE": {"time_embedding.", "temporal_moe.", "placeholders."},
    "-Text": {"items.projections.text.", "encoders.text.", "placeholders.text."},
    "-Image": {"items.projections.image.", "encoders.image.", "placeholders.image."},
    "-CP": {"cp_head."},
    "-PCL": {"placeholders."},
    "-IDCL": set(),
    "sasrec": {"interactive_moe.", "time_embedding.", "temporal_moe.", "placeholders.", "cp_head.",
               "items.projections.", "encoders.text.", "encoders.image."},
}
# parameters whose width follows the number of modalities
RESHAPED = ("interactive_moe.", "temporal_moe.expert_weight", "cp_head.weight")


@pytest.mark.parametrize("variant", list(REMOVED))
def test_ablation_removes_exactly_its_parameters(variant):
    """Spec §4 variants: each ablation removes exactly its modules' parameters and no others."""
    catalog = tiny_catalog()
    full = _variant_model(catalog, "hm4sr")
    ablated = _variant_model(catalog, variant)
    for names in (lambda mdl: {n for n, _ in mdl.named_parameters()}, lambda mdl: set(mdl.state_dict())):
        full_names, ablated_names = names(full), names(ablated)
        assert ablated_names <= full_names, f"{variant} added {ablated_names - full_names}"
        expected = {n for n in full_names if n.startswith(tuple(REMOVED[variant]))}
        assert full_names - ablated_names == expected
        for prefix in REMOVED[variant]:
            assert any(n.startswith(prefix) for n in expected), f"{variant}: nothing under {prefix}"
    full_p, ablated_p = dict(full.named_parameters()), dict(ablated.named_parameters())
    for name, p in ablated_p.items():
        if variant in ("-Text", "-Image") and name.startswith(RESHAPED):
            assert p.shape != full_p[name].shape                              # 2 modalities instead of 3
        else:
            assert p.shape == full_p[name].shape, name


def _load_nonstrict(ablated, full, unexpected_prefixes):
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert missing == []
    assert unexpected and all(k.startswith(tuple(unexpected_prefixes)) for k in unexpected)


def _compare(full_out, ablated_out, keep, atol):
    for j, i in enumerate(keep):
        assert_close(ablated_out.seq_repr[:, j * D:(j + 1) * D], full_out.seq_repr[:, i * D:(i + 1) * D],
                     rtol=0, atol=atol)
        assert_close(ablated_out.item_repr[:, j * D:(j + 1) * D], full_out.item_repr[:, i * D:(i + 1) * D],
                     rtol=0, atol=0)


def test_minus_imoe_is_the_full_model_with_alpha_zero():
    """-IMoE (eq. 7-10 removed) equals the full model with alpha_m = 0 (eq. 8)."""
    catalog = tiny_catalog()
    batch = tiny_batch()
    full = make_model()
    with torch.no_grad():
        full.interactive_moe.alpha.zero_()
    ablated = _variant_model(catalog, "-IMoE")
    _load_nonstrict(ablated, full, ["interactive_moe."])
    torch.manual_seed(11)
    f = full(batch, augment=True)
    torch.manual_seed(11)
    a = ablated(batch, augment=True)
    _compare(f, a, [0, 1, 2], atol=1e-6)
    for m in ("text", "image"):
        assert_close(a.pcl_repr[m], f.pcl_repr[m], rtol=0, atol=1e-6)
    assert a.interactive_gates is None


def test_minus_tmoe_is_the_full_model_with_unit_temporal_experts():
    """-TMoE (eq. 11-16 removed) equals the full model with W_i^temp = 1 (eq. 16)."""
    catalog = tiny_catalog()
    batch = tiny_batch()
    full = make_model()
    with torch.no_grad():
        full.temporal_moe.expert_weight.fill_(1.0)
    ablated = _variant_model(catalog, "-TMoE")
    assert ablated.time_embedding is None and ablated.temporal_moe is None and ablated.pcl_ratio is None
    _load_nonstrict(ablated, full, ["time_embedding.", "temporal_moe.", "placeholders."])
    _compare(full(batch), ablated(batch), [0, 1, 2], atol=1e-5)
    assert ablated(batch, augment=True).pcl_repr == {}


def _modality_state(full: HM4SR, ablated: HM4SR, keep: list[int]) -> dict:
    """The full model's weights restricted to the kept modalities (rows and columns)."""
    k1, k2 = full.cfg.n_interactive_experts, full.cfg.n_temporal_experts
    sd = full.state_dict()
    out = {}
    for name, value in ablated.state_dict().items():
        src = sd[name]
        if name == "interactive_moe.experts.weight":
            src = src.view(3, k1, D, 3, D)[keep][:, :, :, keep].reshape(value.shape)
        elif name == "interactive_moe.experts.bias":
            src = src.view(3, k1, D)[keep].reshape(value.shape)
        elif name in ("interactive_moe.gate_weight", "interactive_moe.gate_bias", "interactive_moe.alpha"):
            src = src[keep]
        elif name == "temporal_moe.expert_weight":
            src = src.view(k2, 3, D)[:, keep].reshape(value.shape)
        elif name == "cp_head.weight":
            src = src.view(-1, 3, D)[:, keep].reshape(value.shape)
        out[name] = src
    return out


@pytest.mark.parametrize("variant, dropped", [("-Text", 1), ("-Image", 2)])
def test_dropping_a_modality_is_the_full_model_with_that_modality_unread(variant, dropped):
    """-Text / -Image: the full model with no expert (eq. 8) or CP weight (eq. 21) reading
    the dropped modality; scores lose exactly its term of eq. 19."""
    catalog = tiny_catalog()
    batch = tiny_batch()
    full = make_model()
    keep = [i for i in range(3) if i != dropped]
    with torch.no_grad():   # neutralise: no expert of the Interactive MoE and no CP weight reads it
        full.interactive_moe.experts.weight.view(3, -1, D, 3, D)[:, :, :, dropped] = 0
        full.cp_head.weight.view(-1, 3, D)[:, dropped] = 0
    ablated = _variant_model(catalog, variant)
    ablated.load_state_dict(_modality_state(full, ablated, keep), strict=True)
    assert ablated.modalities == [MODS[i] for i in keep]
    torch.manual_seed(5)
    f = full(batch, augment=True)
    torch.manual_seed(5)
    a = ablated(batch, augment=True)
    _compare(f, a, keep, atol=1e-5)
    assert_close(a.temporal_gates, f.temporal_gates, rtol=0, atol=1e-6)
    other = MODS[keep[1]]                                   # the remaining content modality
    assert set(a.pcl_repr) == {other}
    assert_close(a.pcl_repr[other], f.pcl_repr[other], rtol=0, atol=1e-5)
    # eq. 19: the ablated scores are the full scores without the dropped modality's term
    h_drop = f.seq_repr[:, dropped * D:(dropped + 1) * D]
    x_drop = f.item_repr[:, dropped * D:(dropped + 1) * D]
    assert_close(ablated.scores(a.seq_repr, a.item_repr)[:, 1:],
                 (full.scores(f.seq_repr, f.item_repr) - h_drop @ x_drop.T)[:, 1:], rtol=0, atol=1e-5)
    full.train(), ablated.train()
    assert_close(ablated(batch, categories=True).cp_logits, full(batch, categories=True).cp_logits,
                 rtol=0, atol=1e-6)


def test_sasrec_is_the_id_stream_of_the_full_model_without_moes():
    """sasrec: the full model's ID stream (eq. 17-19) with both MoEs neutral."""
    catalog = tiny_catalog()
    batch = tiny_batch()
    full = make_model()
    with torch.no_grad():
        full.interactive_moe.alpha.zero_()
        full.temporal_moe.expert_weight.fill_(1.0)
    sasrec = _variant_model(catalog, "sasrec")
    assert sasrec.modalities == ["id"] and sasrec.interactive_moe is None and sasrec.temporal_moe is None
    assert sasrec.cp_head is None and len(sasrec.placeholders) == 0
    sd = full.state_dict()
    sasrec.load_state_dict({k: sd[k] for k in sasrec.state_dict()}, strict=True)
    _compare(full(batch), sasrec(batch), [0], atol=1e-5)


# -- modality subsets ---------------------------------------------------------------------------

@pytest.mark.parametrize("modalities, loss", [(["id"], {"pcl_weight": 0.0}),
                                              (["text"], {"idcl_weight": 0.0})])
def test_single_modality_models_train_end_to_end(modalities, loss):
    """Any non-empty modality subset: eq. 2-27 run, give finite losses and train every parameter."""
    catalog = tiny_catalog()
    batch = tiny_batch()
    cfg = ExperimentConfig()
    cfg.model = tiny_model_cfg(modalities=modalities)
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    torch.manual_seed(0)
    objective = build_objective(cfg.model, cfg.loss, catalog).train()
    model = objective.model
    assert model.interactive_moe is not None and model.temporal_moe is not None
    terms = objective(batch)
    assert torch.isfinite(terms.total)
    terms.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.temporal_moe.expert_weight.grad.abs().sum() > 0
    model.eval()
    out = model(batch)
    assert out.seq_repr.shape == (len(batch), D) and out.item_repr.shape == (N_ITEMS + 1, D)
    scores = model.scores(out.seq_repr, out.item_repr)
    assert scores.shape == (len(batch), N_ITEMS + 1) and torch.isfinite(scores[:, 1:]).all()
    if modalities == ["text"]:
        assert set(out.pcl_repr) == set() and set(model(batch, augment=True).pcl_repr) == {"text"}


def test_pcl_needs_a_content_modality_and_the_temporal_moe():
    """Eq. 24: the placeholder needs the Temporal MoE's time embeddings and a content modality."""
    catalog = tiny_catalog()
    with pytest.raises(ValueError, match="pcl_weight"):
        HM4SR(tiny_model_cfg(modalities=["id"]), catalog, pcl_ratio=0.3)
    with pytest.raises(ValueError, match="pcl_weight"):
        HM4SR(tiny_model_cfg(use_temporal_moe=False), catalog, pcl_ratio=0.3)
