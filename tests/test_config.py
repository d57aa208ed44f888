import pytest
import yaml

from egspo.config import Config, ConfigError, EvalConfig, SamplerConfig, TrainConfig, load_config, save_config


def test_defaults_match_paper_settings():
    cfg = Config(train=TrainConfig(per_device_batch_size=8))
    assert cfg.sampler.gen_length == 256 and cfg.sampler.block_length == 32 and cfg.sampler.steps == 128
    assert cfg.rl.stepwise_lambda == 0.5 and cfg.rl.num_selected_steps == 8
    assert (cfg.rl.epsilon_low, cfg.rl.epsilon_high, cfg.rl.beta) == (0.2, 0.5, 0.04)


def test_yaml_and_overrides_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rl": {"algorithm": "egspo", "num_generations": 4},
                                    "train": {"per_device_batch_size": 8}}))
    cfg = load_config(path, ["train.max_steps=7", "rl.beta=0", "eval.gen_lengths=64,128"])
    assert cfg.rl.stepwise_lambda == 0.0
    assert cfg.train.max_steps == 7 and cfg.rl.beta == 0.0
    assert cfg.eval.gen_lengths == [64, 128]
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["sampler.gen_length=100"], "sampler.block_length"),
        (["sampler.steps=100"], "multiple of the number of blocks"),
        (["rl.num_generations=1"], "rl.num_generations"),
        (["rl.num_selected_steps=200", "sampler.steps=128"], "rl.num_selected_steps"),
        (["rl.nonsense=3"], "Unknown config key rl.nonsense"),
        (["rl.bet=3"], "Did you mean rl.beta"),
        (["modle.dtype=auto"], "Did you mean model"),
        (["rl.algorithm=egspo", "rl.stepwise_lambda=0.5"], "plain EGSPO has lambda 0"),
        (["train.learning_rate=abc"], "train.learning_rate must be a number"),
        (["rl.algorithm=ppo"], "rl.algorithm='ppo'"),
    ],
)
def test_bad_settings_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, ["train.per_device_batch_size=8", *overrides])
    assert fragment in str(info.value)


def test_eval_sampler_uses_half_length_steps():
    sc = EvalConfig().sampler_for(256)
    assert isinstance(sc, SamplerConfig)
    assert (sc.steps, sc.temperature, sc.block_length) == (128, 0.0, 32)


def test_global_batch_checked_against_processes():
    # The global batch (per device x processes) is known only at launch: loading checks nothing about it,
    # validate(num_processes) (called by the trainer) does. The SPEC §6 shape: 6 per device, G = 8, 8 GPUs.
    cfg = load_config(None, ["train.per_device_batch_size=6", "rl.num_generations=8"])
    cfg.validate(num_processes=8)
    cfg.validate(num_processes=4)
    for processes in (1, 2, 3):
        with pytest.raises(ConfigError, match="rl.num_generations=8") as info:
            cfg.validate(num_processes=processes)
        assert "multiple of 4 processes" in str(info.value)
    load_config(None, ["train.per_device_batch_size=4", "rl.num_generations=4"]).validate(num_processes=2)
