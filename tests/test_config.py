"""Config loading: defaults, YAML, overrides, validation errors that name the key, variants."""

import pytest

from hm4sr_dist.config import (ConfigError, ExperimentConfig, apply_variant, load_config, to_dict)

PAPER = "configs/hm4sr_paper.yaml"


def test_paper_config_equals_defaults():
    assert to_dict(load_config(PAPER)) == to_dict(ExperimentConfig())


def test_paper_values():
    cfg = load_config(PAPER)
    assert (cfg.model.hidden_size, cfg.model.max_seq_len, cfg.optim.batch_size, cfg.optim.lr) == (64, 50, 1024, 1e-3)
    assert (cfg.model.n_interactive_experts, cfg.model.n_temporal_experts) == (4, 4)
    assert (cfg.loss.idcl_temperature, cfg.loss.pcl_ratio, cfg.model.interval_scale) == (0.2, 0.3, 100.0)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(PAPER, ["loss.idcl_weight=0.5", "model.modalities=[id, text]",
                              "model.use_temporal_moe=false", "optim.epochs=3"])
    assert cfg.loss.idcl_weight == 0.5
    assert cfg.model.modalities == ["id", "text"]
    assert cfg.model.use_temporal_moe is False
    assert cfg.optim.epochs == 3


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=3", "unknown key model.hiden_size"),
    ("modle.hidden_size=3", "unknown key modle"),
    ("model.hidden_size=0", "model.hidden_size: expected a value >= 1, got 0"),
    ("model.hidden_size=2.5", "model.hidden_size: expected an int"),
    ("model.hidden_dropout=1.5", "model.hidden_dropout: expected a value <= 1.0"),
    ("loss.idcl_temperature=0", "loss.idcl_temperature: expected a value > 0.0"),
    ("model.modalities=[id, audio]", "model.modalities: expected one of"),
    ("model.time_embedding=weekly", "model.time_embedding: expected one of"),
    ("model.use_temporal_moe=maybe", "model.use_temporal_moe: expected true/false"),
    ("model.modalities=[]", "model.modalities: expected a non-empty subset"),
    ("model.n_heads=3", "model.hidden_size: 64 is not divisible by model.n_heads=3"),
    ("eval.valid_metric=auc", "eval.valid_metric: expected one of"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(PAPER, [override])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: -4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.hidden_size"):
        load_config(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)


def test_variants_change_only_their_switch():
    base = to_dict(ExperimentConfig())
    expected = {
        "-IMoE": {("model", "use_interactive_moe"): False},
        "-TMoE": {("model", "use_temporal_moe"): False, ("loss", "pcl_weight"): 0.0},
        "-CP": {("loss", "cp_weight"): 0.0},
        "-IDCL": {("loss", "idcl_weight"): 0.0},
        "-PCL": {("loss", "pcl_weight"): 0.0},
        "-Text": {("model", "modalities"): ["id", "image"]},
        "-Image": {("model", "modalities"): ["id", "text"]},
    }
    for variant, changes in expected.items():
        got = to_dict(apply_variant(ExperimentConfig(), variant))
        diff = {(s, k): got[s][k] for s in ("model", "loss") for k in got[s] if got[s][k] != base[s][k]}
        assert diff == changes, variant


def test_sasrec_variant_matches_its_config_file():
    from_file = load_config("configs/sasrec.yaml")
    from_variant = apply_variant(ExperimentConfig(), "sasrec")
    from_variant.name = "sasrec"
    assert to_dict(from_file) == to_dict(from_variant)
