"""Eq. 2-5: item representations x_id (ID table), x_txt = W_txt f_txt + b_txt, x_img = W_img f_img + b_img."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hm4sr_dist.model import ItemCatalog
from hm4sr_dist.model.items import ItemEmbedding
from hm4sr_tiny import D, N_ITEMS, make_model, randomize_, tiny_batch, tiny_catalog, tiny_model_cfg


def test_item_embedding_matches_affine_maps_by_hand():
    catalog = tiny_catalog()
    emb = randomize_(ItemEmbedding(tiny_model_cfg(), catalog), seed=1)
    out = emb()
    assert out.shape == (N_ITEMS + 1, 3 * D)
    # x_id: the ID table itself
    assert_close(out[:, :D], emb.id_table.weight, rtol=0, atol=0)
    # x_txt, x_img: an affine map of the frozen features, computed in float64 as an explicit sum
    for i, (mod, feats) in enumerate([("text", catalog.text_features), ("image", catalog.image_features)], 1):
        w = emb.projections[mod].weight.double()       # (d, w_m)
        b = emb.projections[mod].bias.double()
        f = feats.double()
        expected = torch.stack([torch.stack([sum(w[r, c] * f[v, c] for c in range(f.shape[1])) + b[r]
                                             for r in range(D)]) for v in range(N_ITEMS + 1)])
        assert_close(out[:, i * D:(i + 1) * D].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modalities", [["image", "id"], ["text"], ["id"]])
def test_concatenation_follows_cfg_modalities_order(modalities):
    catalog = tiny_catalog()
    emb = randomize_(ItemEmbedding(tiny_model_cfg(modalities=modalities), catalog), seed=2)
    out = emb()
    assert out.shape == (N_ITEMS + 1, len(modalities) * D)
    for i, mod in enumerate(modalities):
        part = out[:, i * D:(i + 1) * D]
        if mod == "id":
            expected = emb.id_table.weight
        else:
            proj = emb.projections[mod]
            expected = F.linear(catalog.feature_table(mod), proj.weight, proj.bias)
        assert_close(part, expected, rtol=1e-6, atol=1e-6)


def test_id_padding_row_is_zero_and_gets_no_gradient():
    batch = tiny_batch()
    model = make_model(randomize=False)          # the model's own initialisation
    assert torch.count_nonzero(model.items.id_table.weight[0]) == 0
    assert torch.count_nonzero(model.item_representations()[0, :D]) == 0
    # A training step's gradient never reaches the padding row (padded slots and the -inf column
    # are the only readers of row 0), so the row stays zero under training.
    model.train()
    out = model(batch, augment=True, categories=True)
    scores = model.scores(out.seq_repr, out.item_repr)
    loss = F.cross_entropy(scores, batch.target) + out.cp_logits[out.real].square().mean() \
        + sum(h.square().mean() for h in out.pcl_repr.values())
    loss.backward()
    grad = model.items.id_table.weight.grad
    assert torch.count_nonzero(grad[1:]) > 0
    assert torch.count_nonzero(grad[0]) == 0


def test_frozen_features_are_neither_parameters_nor_buffers():
    # Held outside the module's tensors (docs: .to(), half casts, deepcopy and DeepSpeed would copy
    # a buffer); tests/model/test_feature_tables.py covers the memory-mapped case.
    catalog = tiny_catalog()
    cat64 = ItemCatalog(n_items=catalog.n_items, text_features=catalog.text_features.double(),
                        image_features=catalog.image_features.double())
    emb = ItemEmbedding(tiny_model_cfg(), cat64)
    assert dict(emb.named_buffers()) == {}
    params = dict(emb.named_parameters())
    for mod in ("text", "image"):
        held = emb.features[mod].table
        assert not held.requires_grad
        assert held.data_ptr() == cat64.feature_table(mod).data_ptr()     # the caller's table, no copy
    assert not any("features" in k for k in emb.state_dict())          # kept out of checkpoints
    assert set(params) == {"id_table.weight", "projections.text.weight", "projections.text.bias",
                           "projections.image.weight", "projections.image.bias"}


def test_missing_feature_table_is_an_error():
    catalog = tiny_catalog()
    no_image = ItemCatalog(n_items=catalog.n_items, text_features=catalog.text_features)
    with pytest.raises(ValueError, match="image"):
        ItemEmbedding(tiny_model_cfg(), no_image)


@pytest.mark.parametrize("rows", [(0, 4), (4, 10), (7, 7)])
def test_a_slice_of_the_table_is_the_slice_of_the_whole_table(rows):
    """ItemEmbedding(rows=...) (a vocabulary-parallel worker's): no ID parameter, the ID rows handed
    in, the content features a view of the slice's rows, the projections whole."""
    catalog, cfg = tiny_catalog(), tiny_model_cfg()
    whole = randomize_(ItemEmbedding(cfg, catalog), seed=2)
    part = ItemEmbedding(cfg, catalog, rows=rows)
    assert not hasattr(part, "id_table") and "id_table.weight" not in part.state_dict()
    part.load_state_dict({k: v for k, v in whole.state_dict().items() if k != "id_table.weight"})
    a, z = rows
    id_rows = whole.id_table.weight[a:z].detach().clone().requires_grad_()
    # Equal up to float rounding: a product of fewer rows may take another CPU GEMM kernel (seen on
    # a Xeon here: 2.4e-7 apart), so bit equality is not promised.
    assert_close(part(id_rows), whole()[a:z], rtol=1e-6, atol=1e-6)
    assert part.features["text"].table.data_ptr() == catalog.text_features[a:].data_ptr() or a == z
    assert part.features["text"].shape == (z - a, catalog.text_features.shape[1])
    with pytest.raises(ValueError, match="ID rows are handed in exactly when"):
        part()
    with pytest.raises(ValueError, match="id_rows"):
        part(torch.zeros(z - a + 1, D))


def test_a_pickled_mapped_slice_maps_the_same_rows(tmp_path):
    import pickle

    import numpy as np

    from hm4sr_dist.data.catalog import map_feature_table
    from hm4sr_dist.model.items import FrozenFeatures

    np.save(tmp_path / "text.npy", np.arange(30, dtype=np.float16).reshape(10, 3))
    frozen = FrozenFeatures(map_feature_table(tmp_path / "text.npy", rows=10), str(tmp_path / "text.npy"))
    part = frozen.rows(2, 8).rows(1, 4)                                   # rows 3..5 of the file
    again = pickle.loads(pickle.dumps(part))
    assert again.window == (3, 6, 10) and torch.equal(again.table, frozen.table[3:6])
