"""Shared tiny set-up for tests/model (d=8, L=7, B=5, 9 items), and `reference_forward`: eq. 2-19
and 24 written out from a model's parameters, the independent reference of the forward tests.

Plain functions in a module with a unique name, deliberately not a `conftest.py`: the other test
folders import their helpers with `from conftest import ...`, which a second conftest module in
this folder would shadow (pytest keeps only one module called `conftest` in sys.modules).
"""

from __future__ import annotations

import math

import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.config import ExperimentConfig, ModelConfig
from hm4sr_dist.model import HM4SR, ItemCatalog
from hm4sr_dist.model.time import max_bucket_for

D = 8            # hidden size
L = 7            # padded sequence length (= max_seq_len)
N_ITEMS = 9
T0 = 1_700_000_000
TXT_W, IMG_W, N_CAT = 6, 5, 4


def tiny_model_cfg(**overrides) -> ModelConfig:
    cfg = ExperimentConfig()
    m = cfg.model
    m.hidden_size, m.inner_size, m.max_seq_len = D, 16, L
    m.n_layers, m.n_heads = 2, 2
    m.n_interactive_experts, m.n_temporal_experts = 3, 3      # k1 != M and k2 != 4: catches mix-ups
    m.hidden_dropout = m.attn_dropout = 0.1
    for key, value in overrides.items():
        setattr(m, key, value)
    cfg.validate()
    return m


def tiny_catalog(seed: int = 0) -> ItemCatalog:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(N_ITEMS + 1, TXT_W, generator=g)
    image = torch.randn(N_ITEMS + 1, IMG_W, generator=g)
    cats = torch.rand(N_ITEMS + 1, N_CAT, generator=g) < 0.4
    text[0] = image[0] = 0
    cats[0] = False
    return ItemCatalog(n_items=N_ITEMS, text_features=text, image_features=image, categories=cats,
                       max_interval_bucket=max_bucket_for(40 * 86400, 100.0),
                       time_origin=T0 - 3 * 86400, n_days=60)


def tiny_batch(seed: int = 0) -> Batch:
    """Right-padded, lengths 7, 3, 1, 5, 2; gaps from 0 s to weeks; padded slots hold 0."""
    g = torch.Generator().manual_seed(seed)
    seq_len = torch.tensor([7, 3, 1, 5, 2])
    b = len(seq_len)
    gaps = torch.tensor([0, 1, 59, 3600, 86400, 20 * 86400, 7])
    item_seq = torch.zeros(b, L, dtype=torch.long)
    time_seq = torch.zeros(b, L, dtype=torch.long)
    for row, n in enumerate(seq_len.tolist()):
        item_seq[row, :n] = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
        steps = gaps[torch.randperm(len(gaps), generator=g)[:n]]
        steps[0] = int(torch.randint(0, 86400, (1,), generator=g))
        time_seq[row, :n] = T0 + torch.cumsum(steps, 0)
    target = torch.randint(1, N_ITEMS + 1, (b,), generator=g)
    return Batch(item_seq, time_seq, seq_len, target)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Give every parameter a generic random value (non-zero biases, non-unit LayerNorms), so that
    a wiring mistake cannot hide behind a zero or one initialisation. Padding rows are re-zeroed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
            if name.endswith("id_table.weight"):
                p[0].zero_()
    return module


def make_model(cfg: ModelConfig | None = None, category_head: bool = True, pcl_ratio: float | None = 0.3,
               seed: int = 0, randomize: bool = True, catalog: ItemCatalog | None = None) -> HM4SR:
    """An eval-mode HM4SR on the tiny catalogue; `randomize` gives every parameter a generic value."""
    torch.manual_seed(seed)
    model = HM4SR(cfg or tiny_model_cfg(), catalog or tiny_catalog(), category_head=category_head,
                  pcl_ratio=pcl_ratio)
    if randomize:
        randomize_(model, seed)
        if model.temporal_moe is not None:         # keep the element-wise experts near 1 (realistic)
            with torch.no_grad():
                model.temporal_moe.expert_weight.add_(1.0)
    return model.eval()


# -- The reference: eq. 2-19 and 24 written out from the parameters ------------------------------
# Independent of the modules under test: it reads only `model.named_parameters()`, `model.cfg` and
# the catalogue, and redoes every step with plain float64 tensor maths (a hand-written post-LN
# Transformer included). `drop(site, tensor)` marks where dropout sits (docs/model.md, RecBole):
# "input" after eq. 17's LayerNorm; "attn_probs{n}", "attn_out{n}", "ffn_out{n}" in layer n.

def _no_drop(site: str, x: torch.Tensor) -> torch.Tensor:
    return x


def ref_layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)                     # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / 2 ** 0.5))                     # exact (erf) GELU, RecBole's


def reference_encoder(params: dict, prefix: str, cfg: ModelConfig, seq, seq_len, drop=_no_drop):
    """Eq. 17-18: S' = Dropout(LayerNorm(S)); causal post-LN layers; H at position seq_len - 1.

    params: name -> float64 tensor; prefix: e.g. "encoders.text"; seq (B, L, d) -> (B, d).
    """
    p = lambda name: params[f"{prefix}.{name}"]                         # noqa: E731
    eps, heads = cfg.layer_norm_eps, cfg.n_heads
    b, n, d = seq.shape
    dh = d // heads
    future = torch.ones(n, n, dtype=torch.bool).triu(1)                 # key j > query i
    h = drop("input", ref_layer_norm(seq, p("norm.weight"), p("norm.bias"), eps))        # eq. 17
    for k in range(cfg.n_layers):
        w = lambda name: p(f"layers.{k}.{name}")                         # noqa: E731
        qkv = h @ w("attention.qkv.weight").T + w("attention.qkv.bias")  # rows: q, then k, then v
        q, key, v = (t.reshape(b, n, heads, dh).transpose(1, 2) for t in qkv.split(d, dim=-1))
        logits = (q @ key.transpose(-1, -2) / dh ** 0.5).masked_fill(future, float("-inf"))
        probs = drop(f"attn_probs{k}", torch.softmax(logits, dim=-1))                  # (B, H, L, L)
        context = (probs @ v).transpose(1, 2).reshape(b, n, d)
        attn = context @ w("attention.out.weight").T + w("attention.out.bias")
        h = ref_layer_norm(h + drop(f"attn_out{k}", attn), w("attn_norm.weight"), w("attn_norm.bias"), eps)
        ffn = ref_gelu(h @ w("ffn.0.weight").T + w("ffn.0.bias")) @ w("ffn.2.weight").T + w("ffn.2.bias")
        h = ref_layer_norm(h + drop(f"ffn_out{k}", ffn), w("ffn_norm.weight"), w("ffn_norm.bias"), eps)
    return h[torch.arange(b), seq_len - 1]                                                # eq. 18


def reference_time_embedding(params: dict, cfg: ModelConfig, catalog: ItemCatalog, batch: Batch):
    """Eq. 11-13 element by element in Python floats: [r_1; r_2] (B, L, 2d); padded slots (bucket 0,
    r_2 = 0) are never read by a real position."""
    table = params["time_embedding.interval_table.weight"]                              # M_t
    l_j = params["time_embedding.time_linear.weight"].squeeze(-1)
    z_j = params["time_embedding.time_linear.bias"]
    d = cfg.hidden_size
    b, n = batch.item_seq.shape
    r = torch.zeros(b, n, 2 * d, dtype=torch.float64)
    r[:, :, :d] = table[0]
    for row in range(b):
        times = batch.time_seq[row].tolist()
        for i in range(int(batch.seq_len[row])):
            a = 0 if i == 0 else max(times[i] - times[i - 1], 0)                          # eq. 11
            bucket = min(math.floor(cfg.interval_scale * math.log2(a + 1)), catalog.max_interval_bucket)
            r[row, i, :d] = table[bucket]                                                  # eq. 12
            t = (times[i] - catalog.time_origin) / cfg.time_unit_seconds
            for j in range(d):                                                             # eq. 13
                r[row, i, d + j] = math.cos((float(l_j[j]) * t + float(z_j[j])) * cfg.time_freq ** (-j / d))
    return r


def reference_forward(model: HM4SR, catalog: ItemCatalog, batch: Batch, placeholder=None,
                      drop=_no_drop) -> dict:
    """The HM4SR forward of eq. 2-19 (and the PCL view of eq. 24 where `placeholder`, a (B, L) bool
    mask, is given), from the parameters, in float64. Eval-mode semantics unless `drop` says
    otherwise. Returns every intermediate the tests compare."""
    cfg, mods = model.cfg, list(model.cfg.modalities)
    assert cfg.time_embedding == "interval_absolute" or not cfg.use_temporal_moe
    P = {name: t.detach().double() for name, t in model.named_parameters()}
    d, m_count = cfg.hidden_size, len(mods)
    b, n = batch.item_seq.shape
    # eq. 2-5: ID table; frozen features (from the catalogue) through W_m f_m + b_m
    x = {}
    for m in mods:
        if m == "id":
            x[m] = P["items.id_table.weight"]
        else:
            f = catalog.feature_table(m).double()
            x[m] = f @ P[f"items.projections.{m}.weight"].T + P[f"items.projections.{m}.bias"]
    # eq. 6: one position table for every modality
    e = {m: x[m][batch.item_seq] + P["position.weight"][:n] for m in mods}                # (B, L, d)
    out = {"x": x, "e": e}
    # eq. 7-10
    if cfg.use_interactive_moe:
        k1 = cfg.n_interactive_experts
        e_inter = torch.cat([e[m] for m in mods], dim=-1)                                   # eq. 7
        # expert i of target modality mi: rows (mi * k1 + i) * d ... of the stacked expert matrix
        w_exp = P["interactive_moe.experts.weight"].view(m_count, k1, d, m_count * d)
        b_exp = P["interactive_moe.experts.bias"].view(m_count, k1, d)
        gates, e_new = [], {}
        for mi, m in enumerate(mods):
            g = torch.softmax(e[m] @ P["interactive_moe.gate_weight"][mi]
                              + P["interactive_moe.gate_bias"][mi], dim=-1)                # eq. 9
            mixed = sum(g[..., i:i + 1] * (e_inter @ w_exp[mi, i].T + b_exp[mi, i]) for i in range(k1))
            e_new[m] = e[m] + P["interactive_moe.alpha"][mi] * mixed                       # eq. 8, 10
            gates.append(g)
        e = e_new
        out["interactive_gates"] = torch.stack(gates, dim=2)                               # (B, L, M, k1)
    out["e_prime"] = e
    # eq. 11-16
    s = e
    if cfg.use_temporal_moe:
        r = reference_time_embedding(P, cfg, catalog, batch)
        g2 = torch.softmax(r @ P["temporal_moe.gate.weight"].T + P["temporal_moe.gate.bias"], -1)  # eq. 14
        e_temp = torch.cat([e[m] for m in mods], dim=-1)                                    # eq. 15
        x_temp = sum(g2[..., i:i + 1] * (P["temporal_moe.expert_weight"][i] * e_temp)
                     for i in range(cfg.n_temporal_experts))                                # eq. 16
        s = {m: x_temp[..., mi * d:(mi + 1) * d] for mi, m in enumerate(mods)}
        out["time"], out["temporal_gates"] = r, g2
    out["S"] = s
    # eq. 17-18
    out["H"] = {m: reference_encoder(P, f"encoders.{m}", cfg, s[m], batch.seq_len, drop) for m in mods}
    # eq. 19 (padding item 0 is not a candidate)
    scores = sum(out["H"][m] @ x[m].T for m in mods)
    scores[:, 0] = float("-inf")
    out["scores"] = scores
    # eq. 24: the time placeholder replaces the masked positions of the content streams
    if placeholder is not None:
        out["H_aug"] = {}
        for m in mods:
            if m == "id":
                continue
            tp = out["time"] @ P[f"placeholders.{m}.weight"].T + P[f"placeholders.{m}.bias"]
            augmented = torch.where(placeholder.unsqueeze(-1), tp, s[m])
            out["H_aug"][m] = reference_encoder(P, f"encoders.{m}", cfg, augmented, batch.seq_len, drop)
    # eq. 21: CP logits of every real input item, from [x_id; x_txt; x_img] (no position)
    if "cp_head.weight" in P:
        real = batch.padding_mask()
        x_cat = torch.cat([x[m] for m in mods], dim=-1)
        out["cp_logits"] = x_cat[batch.item_seq[real]] @ P["cp_head.weight"].T + P["cp_head.bias"]
    return out
