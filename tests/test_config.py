import warnings

import pytest
import yaml

from egspo.config import Config, ConfigError, EGSPOConfig, EvalConfig, SamplerConfig, load_config, save_config


def test_defaults_match_paper_settings():
    cfg = EGSPOConfig(per_device_train_batch_size=8)
    assert cfg.max_completion_length == 256 and cfg.block_length == 32 and cfg.diffusion_steps == 128
    assert cfg.stepwise_lambda == 0.5 and cfg.num_selected_steps == 8
    assert (cfg.epsilon, cfg.epsilon_high, cfg.beta) == (0.2, 0.5, 0.04)
    assert Config is EGSPOConfig  # the 0.1 name still works


def test_trl_names():
    # the fields a TRL GRPOConfig user reaches for first exist under TRL's names
    cfg = EGSPOConfig(algorithm="diffu_grpo", output_dir="x", max_steps=3, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=32, block_length=8, diffusion_steps=8,
                      learning_rate=1e-4, save_steps=1, seed=3, beta=0.0, epsilon=0.3, epsilon_high=0.4,
                      num_iterations=2, temperature=1.0, logging_steps=2, save_total_limit=1, report_to=[],
                      max_prompt_length=64, gradient_accumulation_steps=1, p_mask_prompt=0.1, remasking="random")
    assert cfg.rollout_sampler() == SamplerConfig(gen_length=32, block_length=8, steps=8, temperature=1.0,
                                                  remasking="random", merge_lora=True)  # use_peft's default


def test_yaml_and_overrides_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "egspo", "num_generations": 4, "per_device_train_batch_size": 8}))
    cfg = load_config(path, ["max_steps=7", "beta=0", "eval_completion_lengths=64,128"])
    assert cfg.stepwise_lambda == 0.0
    assert cfg.max_steps == 7 and cfg.beta == 0.0
    assert cfg.eval_completion_lengths == [64, 128]
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_sectioned_files_and_overrides_of_0_1_still_load_with_one_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"rl": {"algorithm": "egspo", "epsilon_low": 0.3},
                                    "train": {"per_device_batch_size": 8, "mixed_precision": "no"},
                                    "sampler": {"gen_length": 64, "steps": 32}, "task": {"name": "countdown"}}))
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(path, ["train.max_steps=5"])
    assert (cfg.algorithm, cfg.epsilon, cfg.per_device_train_batch_size, cfg.bf16) == ("egspo", 0.3, 8, False)
    assert (cfg.max_completion_length, cfg.diffusion_steps, cfg.task, cfg.max_steps) == (64, 32, "countdown", 5)
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(messages) == 2  # one for the file (every rename listed), one for the override
    assert "rl.epsilon_low -> epsilon" in messages[0] and "train.max_steps -> max_steps" in messages[1]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["max_completion_length=100"], "block_length"),
        (["diffusion_steps=100"], "multiple of the number of blocks"),
        (["num_generations=1"], "num_generations=1"),
        (["num_selected_steps=200", "diffusion_steps=128"], "num_selected_steps=200"),
        (["nonsense=3"], "Unknown config key 'nonsense'"),
        (["bet=3"], "Did you mean beta"),
        (["gen_length=64"], "Did you mean max_completion_length"),
        (["rl.bet=3"], "Did you mean beta"),
        (["train.num_selected_steps=4"], "now 'num_selected_steps'"),
        (["modle.dtype=auto"], "use the flat field name"),
        (["algorithm=egspo", "stepwise_lambda=0.5"], "plain EGSPO has lambda 0"),
        (["learning_rate=abc"], "learning_rate must be a number"),
        (["algorithm=ppo"], "algorithm='ppo'"),
    ],
)
def test_bad_settings_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_config(None, ["per_device_train_batch_size=8", *overrides])
    assert fragment in str(info.value)


def test_errors_say_where_the_value_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 3\nlearning_rate: fast\n")
    with pytest.raises(ConfigError, match=rf"learning_rate must be a number.*\({path}:2\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"command-line override 'num_generations=1'"):
        load_config(None, ["num_generations=1"])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of field: value"):
        load_config(path)
    path.write_text("rl: 5\n")
    with pytest.raises(ConfigError, match="Section 'rl'.*must be a mapping"):
        load_config(path)


def test_options_the_algorithm_ignores_are_warned_about():
    with pytest.warns(UserWarning, match="kl_estimator='exact' has no effect with algorithm='diffu_grpo'"):
        EGSPOConfig(algorithm="diffu_grpo", kl_estimator="exact")
    with pytest.warns(UserWarning, match="num_iterations=3 has no effect"):
        EGSPOConfig(num_iterations=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EGSPOConfig(algorithm="diffu_grpo", num_iterations=3, epsilon=0.5)  # used: no warning


def test_eval_sampler_uses_half_length_steps():
    sc = EvalConfig().sampler_for(256)
    assert isinstance(sc, SamplerConfig)
    assert (sc.steps, sc.temperature, sc.block_length) == (128, 0.0, 32)


def test_global_batch_checked_against_processes():
    # The global batch (per device x processes) is known only at launch: loading checks nothing about it,
    # validate(num_processes) (called by the trainer) does. The paper's shape: 6 per device, G = 8, 8 GPUs.
    cfg = load_config(None, ["per_device_train_batch_size=6", "num_generations=8"])
    cfg.validate(num_processes=8)
    cfg.validate(num_processes=4)
    for processes in (1, 2, 3):
        with pytest.raises(ConfigError, match="num_generations=8") as info:
            cfg.validate(num_processes=processes)
        assert "multiple of 4 processes" in str(info.value)
    load_config(None, ["per_device_train_batch_size=4", "num_generations=4"]).validate(num_processes=2)


def test_yaml_boolean_words_reach_string_choices(tmp_path):
    """YAML 1.1 reads `no` as false: TRL's `eval_strategy: no` must still mean "no" (file and override)."""
    assert load_config(None, ["eval_strategy=no"]).eval_strategy == "no"
    path = tmp_path / "c.yaml"
    path.write_text("eval_strategy: no\n")
    assert load_config(path).eval_strategy == "no"
    with pytest.raises(ConfigError, match="eval_strategy=True is not one of"):
        load_config(None, ["eval_strategy=yes"])  # no choice spelled like true: still refused, by name


def test_report_to_none_is_no_tracker():
    assert load_config(None, ["report_to=none"]).report_to == []
    with pytest.raises(ConfigError, match="or none"):
        load_config(None, ["report_to=nonsense"])
