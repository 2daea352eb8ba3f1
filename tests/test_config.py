import pytest
import torch

from rosa_scale.config import ConfigError, RosaConfig, TrainConfig, load_config, rosa_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nrosa:\n  rank: 8\n  target_modules: [q_proj, v_proj]\n")
    cfg = load_config(path, {"rosa.method": "eigh", "max_steps": None, "resample_every": "epoch"})
    assert cfg.lr == 1e-3 and cfg.rosa.rank == 8 and cfg.rosa.method == "eigh"
    assert cfg.rosa.target_modules == ["q_proj", "v_proj"] and cfg.max_steps is None
    assert cfg.resample_every == "epoch" and cfg.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize("overrides,message", [
    ({"rosa.rank": 1.5}, "fraction must be in (0, 1)"),
    ({"rosa.rank": 0}, "must be >= 1"),
    ({"batch_size": 0}, "'batch_size' must be >= 1"),
    ({"resample_every": "often"}, "'resample_every' must be"),
    ({"rosa.method": "qr", "rosa.sampling": "top"}, "with method 'qr'"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"rosa": 3}, "must be a mapping"),
    ({"attn_implementation": "flash"}, "'attn_implementation' must be one of sdpa, eager, flex_attention"),
    ({"gc_every": 0}, "'gc_every' must be >= 1 or null, got 0"),
    ({"fsdp_factors": "replicated"}, "'fsdp_factors' replicated needs fsdp: true"),
    ({"fsdp_factors": "whole", "fsdp": True}, "'fsdp_factors' must be"),
])
def test_invalid_values(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_rosa_config_helper():
    assert rosa_config(rank=0.5) == RosaConfig(rank=0.5)
    with pytest.raises(ConfigError, match="unknown config key 'rnk'"):
        rosa_config(rnk=3)


def test_shipped_train_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    paths = sorted(root.glob("*.yaml"))
    assert paths
    for path in paths:
        load_config(path)


def test_demo_config_is_the_default():
    from pathlib import Path

    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "train" / "demo.yaml")
    assert demo == TrainConfig()


@pytest.mark.parametrize("field,value", [("factorize_device", "gpu"), ("method", "bad"), ("fixed_dtype", "fp8")])
def test_a_rosa_config_built_in_python_is_checked_like_a_file(field, value):
    from rosa_scale import RosaConfig, apply_rosa
    from tests.tiny import tiny_llama

    model = tiny_llama(vocab_size=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=f"config key '{field}' must be .*got '{value}'"):
        apply_rosa(model, RosaConfig(rank=2, **{field: value}))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing changed
