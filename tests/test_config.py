"""Config loading: defaults, YAML, overrides, validation errors that name the key and its source,
variants."""

import pytest

from hm4sr_dist.config import (ConfigError, ExperimentConfig, apply_variant, command_line_keys, load_config,
                               load_tracked, to_dict)
from hm4sr_dist.feasibility import with_variant

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


CL = "(command line)"


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=3", f"unknown key model.hiden_size {CL}; did you mean model.hidden_size?"),
    ("modle.hidden_size=3", f"unknown key modle.hidden_size {CL}; did you mean model.hidden_size?"),
    ("optim.lrr=0.1", f"unknown key optim.lrr {CL}; did you mean optim.lr?"),
    ("lr=0.1", f"unknown key lr {CL}; did you mean optim.lr?"),
    ("batch_size=8", f"unknown key batch_size {CL}; did you mean eval.batch_size or optim.batch_size?"),
    ("optim.lr.x=1", f"unknown key optim.lr.x {CL}; did you mean optim.lr?"),
    ("xyzzy=1", f"unknown key xyzzy {CL}; the keys at the top are data, eval"),
    ("optim.lr=abc", f"optim.lr {CL}: expected a number > 0, got 'abc'"),
    ("optim.lr=0", f"optim.lr {CL}: expected a number > 0, got 0"),
    ("optim.lr=.nan", f"optim.lr {CL}: expected a number > 0, got nan"),
    ("model.hidden_size=0", f"model.hidden_size {CL}: expected an int >= 1, got 0"),
    ("model.hidden_size=2.5", f"model.hidden_size {CL}: expected an int >= 1, got 2.5"),
    ("model.hidden_dropout=1.5", f"model.hidden_dropout {CL}: expected a number in [0, 1], got 1.5"),
    ("loss.idcl_temperature=0", f"loss.idcl_temperature {CL}: expected a number > 0, got 0"),
    ("model.modalities=[id, audio]", f"model.modalities {CL}: expected a non-empty list of distinct values "
                                     "from ['id', 'text', 'image'], got ['id', 'audio']"),
    ("model.modalities=[id, imgae]", "; did you mean image?"),
    ("model.modalities=[]", f"model.modalities {CL}: expected a non-empty list of distinct values"),
    ("model.modalities=[id, id]", f"model.modalities {CL}: expected a non-empty list of distinct values"),
    ("model.modalities=[id", f"model.modalities {CL}: expected a YAML value"),
    ("model.time_embedding=weekly", f"model.time_embedding {CL}: expected one of ['interval_absolute',"),
    ("model.use_temporal_moe=maybe", f"model.use_temporal_moe {CL}: expected true or false, got 'maybe'"),
    ("eval.ks=[0, 5]", f"eval.ks {CL}: expected a non-empty list of ints >= 1, got [0, 5]"),
    ("eval.ks=[20]", f"eval.ks {CL}: expected a list including 5 (eval.valid_metric = ndcg@5), got [20]"),
    ("eval.valid_metric=auc", f"eval.valid_metric {CL}: expected one of ['hit@10', 'hit@5'"),
    ("model.n_heads=3", f"model.n_heads {CL}: expected a divisor of model.hidden_size = 64, got 3"),
    ("model.hidden_size=33", f"model.hidden_size {CL}: expected a multiple of model.n_heads = 2, got 33"),
    ("optim.batch_size=1023", f"optim.batch_size {CL}: expected a multiple of train.num_workers * "
                              "train.grad_accum_steps = 2, got 1023"),
    ("train.num_workers=3", f"train.num_workers {CL}: expected a divisor of optim.batch_size = 1024"),
    ("optim.lr", f"override 'optim.lr' {CL}: expected key.path=value"),
])
def test_bad_values_name_the_key_the_source_and_what_was_expected(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(PAPER, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_errors_carry_their_parts_and_survive_pickling():
    import pickle

    with pytest.raises(ConfigError) as info:
        load_config(PAPER, ["optim.lr=abc"])
    err = info.value
    assert (err.key, err.source, err.expected, err.got) == ("optim.lr", "command line", "a number > 0", "abc")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.key == "optim.lr"
    assert str(ConfigError("free text")) == "free text"


def test_values_given_as_yaml_1_1_strings_are_read_as_numbers():
    assert load_config(PAPER, ["optim.lr=1e-3", "train.run_name=2024"]).optim.lr == 1e-3
    assert load_config(PAPER, ["train.run_name=2024"]).train.run_name == "2024"


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: -4\n")
    with pytest.raises(ConfigError, match=rf"^model\.hidden_size \({bad}\): expected an int >= 1, got -4$"):
        load_config(bad)
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^unknown key optim\.lrr \({bad}\); did you mean optim\.lr\?$"):
        load_config(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the config file"):
        load_config(tmp_path / "missing.yaml")


def test_an_override_is_blamed_on_the_command_line_not_the_yaml_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 0.01\nmodel:\n  hidden_size: 32\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr \(command line\)"):
        load_config(good, ["optim.lr=abc"])
    # a clash between a YAML key and an override blames the override
    with pytest.raises(ConfigError, match=r"^model\.n_heads \(command line\): expected a divisor of "
                                          r"model\.hidden_size = 32, got 3$"):
        load_config(good, ["model.n_heads=3"])
    clash = tmp_path / "clash.yaml"
    clash.write_text("model:\n  hidden_size: 32\n  n_heads: 5\n")
    with pytest.raises(ConfigError, match=rf"^model\.hidden_size \({clash}\): expected a multiple of "
                                          r"model\.n_heads = 5, got 32$"):
        load_config(clash)
    cfg, sources = load_tracked(good, ["optim.epochs=3"])
    assert sources == {"optim.lr": str(good), "model.hidden_size": str(good), "optim.epochs": "command line"}
    assert cfg.optim.epochs == 3


def test_variant_errors_and_suggestions():
    with pytest.raises(ConfigError) as info:
        with_variant(ExperimentConfig(), "-TMOE")
    assert str(info.value) == ("--variant: expected one of ['hm4sr', '-IMoE', '-TMoE', '-CP', '-IDCL', "
                               "'-PCL', '-Text', '-Image', 'sasrec'], got '-TMOE'; did you mean -TMoE?")
    # an override the variant would silently undo, or one it makes infeasible, is an error
    cfg, sources = load_tracked(PAPER, ["model.use_temporal_moe=true", "loss.pcl_weight=0.5"])
    with pytest.raises(ConfigError, match=r"^model\.use_temporal_moe \(command line\): conflicts with "
                                          r"--variant=-TMoE, which sets it to false$"):
        apply_variant(cfg, "-TMoE", explicit=command_line_keys(sources))
    cfg, sources = load_tracked(PAPER, ["loss.pcl_weight=0.5"])
    with pytest.raises(ConfigError, match=r"^loss\.pcl_weight \(command line\): expected 0 when "
                                          r"model\.use_temporal_moe is false, got 0\.5"):
        with_variant(cfg, "-TMoE", explicit=command_line_keys(sources))
    assert with_variant(cfg, "-TMoE").loss.pcl_weight == 0.0      # not asked for: switched off
    assert apply_variant(cfg, "-TMoE").loss.pcl_weight == 0.5     # the variant's own switch only


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
        got = to_dict(with_variant(ExperimentConfig(), variant))
        diff = {(s, k): got[s][k] for s in ("model", "loss") for k in got[s] if got[s][k] != base[s][k]}
        assert diff == changes, variant


def test_sasrec_variant_matches_its_config_file():
    from_file = load_config("configs/sasrec.yaml")
    from_variant = with_variant(ExperimentConfig(), "sasrec")
    from_variant.name = "sasrec"
    assert to_dict(from_file) == to_dict(from_variant)


def test_true_and_false_on_the_command_line_fill_string_switches():
    """YAML reads `train.compile=true` as a bool; a string switch takes it as 'true'."""
    from hm4sr_dist.config import load_config
    cfg = load_config(None, ["train.compile=true", "train.use_gpu=false"])
    assert cfg.train.compile == "true" and cfg.train.use_gpu == "false"
