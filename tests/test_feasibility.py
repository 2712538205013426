"""The feasibility resolver: what is switched off (with a note) and what is an error, per rule."""

import pytest

from hm4sr_dist.config import ConfigError, ExperimentConfig, to_dict
from hm4sr_dist.feasibility import DataOffer, check, inert_keys, problems, resolve, with_variant

CL = "command line"
ID_ONLY = DataOffer(frozenset({"id"}), categories=False)
NO_CATEGORIES = DataOffer(frozenset({"id", "text", "image"}), categories=False)


def _cfg(**changes) -> ExperimentConfig:
    cfg = ExperimentConfig()
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _diff(before: ExperimentConfig, after: ExperimentConfig) -> dict:
    a, b = to_dict(before), to_dict(after)
    return {f"{s}.{k}": b[s][k] for s in ("model", "loss") for k in a[s] if a[s][k] != b[s][k]}


def test_the_full_model_on_full_data_is_left_alone():
    cfg = ExperimentConfig()
    assert problems(cfg.model, cfg.loss, DataOffer()) == []
    resolved, notes = resolve(cfg, DataOffer())
    assert notes == [] and to_dict(resolved) == to_dict(cfg)


@pytest.mark.parametrize("cfg, offer, changes", [
    # a modality needs its features; PCL then has no content modality left
    (_cfg(), ID_ONLY, {"model.modalities": ["id"], "loss.cp_weight": 0.0, "loss.pcl_weight": 0.0}),
    (_cfg(), DataOffer(frozenset({"id", "text"})), {"model.modalities": ["id", "text"]}),
    # CP needs categories
    (_cfg(), NO_CATEGORIES, {"loss.cp_weight": 0.0}),
    # IDCL needs the id modality
    (_cfg(model__modalities=["text", "image"]), None, {"loss.idcl_weight": 0.0}),
    # PCL needs the Temporal MoE and a text or image modality
    (_cfg(model__use_temporal_moe=False), None, {"loss.pcl_weight": 0.0}),
    (_cfg(model__modalities=["id"]), None, {"loss.pcl_weight": 0.0}),
    (_cfg(model__modalities=["id", "image"]), DataOffer(frozenset({"id", "text"})),
     {"model.modalities": ["id"], "loss.pcl_weight": 0.0}),
])
def test_what_a_rule_forbids_is_switched_off_with_a_note(cfg, offer, changes):
    before = to_dict(cfg)
    resolved, notes = resolve(cfg, offer)
    assert to_dict(cfg) == before                            # the input is not modified
    assert _diff(cfg, resolved) == changes
    assert sorted(n.split(":")[0] for n in notes) == sorted(changes)
    assert problems(resolved.model, resolved.loss, offer) == []
    check(resolved, offer)                                   # the strict check passes once resolved
    assert to_dict(resolve(resolved, offer).config) == to_dict(resolved)   # idempotent


def test_notes_say_why():
    _, notes = resolve(ExperimentConfig(), ID_ONLY)
    assert notes == [
        "model.modalities: ['text', 'image'] dropped (the data set has no such features)",
        "loss.cp_weight: set to 0 (the data set has no item categories)",
        "loss.pcl_weight: set to 0 (PCL needs the Temporal MoE and a text or image modality; "
        "the data set has no text or image features)"]


@pytest.mark.parametrize("cfg, offer, explicit, message", [
    (_cfg(loss__cp_weight=0.5), NO_CATEGORIES, {"loss.cp_weight": CL},
     "loss.cp_weight (command line): expected 0 when the data set has no item categories, got 0.5 "
     "(CP predicts them, eq. 21)"),
    (_cfg(), ID_ONLY, {"model.modalities": CL},
     "model.modalities (command line): expected modalities the data set has features for (['id']), "
     "got ['id', 'text', 'image']"),
    (_cfg(model__use_temporal_moe=False, loss__pcl_weight=0.5), None, {"loss.pcl_weight": CL},
     "loss.pcl_weight (command line): expected 0 when model.use_temporal_moe is false, got 0.5"),
    (_cfg(), ID_ONLY, {"loss.pcl_weight": "--param"},
     "loss.pcl_weight (--param): expected 0 when the data set has no text or image features, got 1.0"),
    (_cfg(model__modalities=["text"]), None, {"loss.idcl_weight": CL},
     "loss.idcl_weight (command line): expected 0 when model.modalities (['text']) has no id, got 1.0"),
    # no modality left is an error whoever set it
    (_cfg(model__modalities=["image"]), ID_ONLY, {},
     "model.modalities: expected at least one of the modalities the data set has features for (['id'])"),
])
def test_an_explicit_request_that_cannot_be_honoured_is_an_error(cfg, offer, explicit, message):
    with pytest.raises(ConfigError) as info:
        resolve(cfg, offer, explicit)
    assert str(info.value).startswith(message)
    with pytest.raises(ConfigError):
        check(cfg, offer, explicit)


def test_explicit_keys_that_are_feasible_pass():
    cfg = _cfg(loss__cp_weight=0.5, model__modalities=["id", "text"])
    resolved, notes = resolve(cfg, DataOffer(frozenset({"id", "text"})), {"loss.cp_weight": CL,
                                                                          "model.modalities": CL})
    assert notes == [] and resolved.loss.cp_weight == 0.5


def test_strict_check_is_what_the_model_asserts():
    with pytest.raises(ConfigError, match="loss.pcl_weight"):
        check(_cfg(model__use_temporal_moe=False))           # explicit=None: every rule is an error
    check(_cfg(model__use_temporal_moe=False), explicit={})  # only explicit keys: nothing asked for


def test_data_offer_from_manifest():
    offer = DataOffer.from_manifest({"features": {"text": {}}, "n_categories": 0})
    assert offer == DataOffer(frozenset({"id", "text"}), categories=False)
    assert DataOffer.from_manifest({"features": {"text": {}, "image": {}}, "n_categories": 7}) == DataOffer()


def test_variants_are_resolved_by_the_same_rules():
    # -TMoE only turns the Temporal MoE off; the resolver switches PCL off with it
    assert with_variant(ExperimentConfig(), "-TMoE").loss.pcl_weight == 0.0
    both = with_variant(with_variant(ExperimentConfig(), "-Text"), "-Image")
    assert both.model.modalities == ["id"] and both.loss.pcl_weight == 0.0


def test_inert_keys():
    assert inert_keys(ExperimentConfig()) == {}
    dead = inert_keys(resolve(_cfg(model__use_temporal_moe=False)).config)
    assert {"model.n_temporal_experts", "loss.pcl_ratio", "model.time_embedding"} <= set(dead)
    assert "model.n_interactive_experts" not in dead
    assert dead["loss.pcl_ratio"] == "PCL is off (loss.pcl_weight = 0.0)"


def test_model_and_objective_point_to_the_resolver():
    from hm4sr_dist.feasibility import unresolved

    err = unresolved("loss.cp_weight", "but the data set has no item categories")
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert str(err).startswith("loss.cp_weight > 0 but the data set has no item categories; fit the config "
                               "to the data with hm4sr_dist.feasibility.resolve")


@pytest.mark.parametrize("overrides, key", [
    (["train.num_workers=1", "optim.batch_size=64"], "train.num_workers"),
    (["optim.grad_clip=1.0"], "optim.grad_clip"),
    (["loss.num_negatives=64"], "loss.num_negatives"),
    (["loss.negative_sampler=popularity"], "loss.negative_sampler"),
    (["loss.in_batch_negatives=false"], "loss.in_batch_negatives"),
    (["train.precision=bf16"], "train.precision"),
])
def test_what_vocab_parallel_cannot_train_is_an_error_naming_the_key(overrides, key):
    from hm4sr_dist.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.main_loss=vocab_parallel"] + overrides)
    assert err.value.key == key and str(err.value).startswith(f"{key} (command line): expected")
    assert "vocab_parallel" in str(err.value)
    cfg = load_config(None, ["loss.main_loss=vocab_parallel", "train.num_workers=4",
                             "loss.item_chunk_size=8"])
    assert cfg.loss.main_loss == "vocab_parallel"


def test_vocab_parallel_half_precision_on_a_gpu_is_an_error_naming_the_key():
    from hm4sr_dist.config import load_config
    from hm4sr_dist.train.engine import check_precision

    cfg = load_config(None, ["loss.main_loss=vocab_parallel"])                   # precision auto
    assert check_precision(cfg, on_gpu=False) == "fp32"
    with pytest.raises(ConfigError, match=r"train.precision: expected fp32 .*\(bf16 here\)"):
        check_precision(cfg, on_gpu=True)


def test_vocab_parallel_needs_the_sharded_table_and_the_others_refuse_it(tiny_log):
    from hm4sr_dist.catalog_loss import build_main_loss
    from hm4sr_dist.objective import build_objective
    from hm4sr_dist.parallel.vocab import ShardedItemTable
    from hm4sr_test_utils import tiny_config

    cfg = tiny_config()
    cfg.loss.main_loss = "vocab_parallel"
    with pytest.raises(ConfigError, match="loss.main_loss: expected vocab_parallel exactly when"):
        build_objective(cfg.model, cfg.loss, tiny_log.catalog)                # no sharded table
    with pytest.raises(ConfigError, match="loss.main_loss: needs the item table sharded"):
        build_main_loss(cfg.loss, tiny_log.catalog.n_items)
    cfg.loss.main_loss = "chunked"
    from hm4sr_dist.objective import BatchExchange
    with pytest.raises(ConfigError, match="loss.main_loss: expected vocab_parallel exactly when"):
        build_objective(cfg.model, cfg.loss, tiny_log.catalog,
                        table=ShardedItemTable(tiny_log.catalog.n_items + 1, BatchExchange()))
