"""Every YAML under conf/ composes and converts to its dataclass; bad values fail naming the key."""


import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from dpo_dist.config import CONF_DIR, Config, ConfigError, compose

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
# Options that need a value the user must give (a local reward model).
REQUIRED = {("judge", "reward_model"): ["judge.reward_model_path=/models/rm"]}


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_yaml_composes_and_converts(group, option):
    cfg = compose([f"{group}={option}"] + REQUIRED.get((group, option), []))
    assert isinstance(cfg, Config)


def test_groups_users_swap_exist():
    assert {"model", "deepspeed", "loss", "judge", "generation", "identity"} <= set(GROUPS)
    assert {"zero2", "zero3", "zero3_offload"} <= {p.stem for p in (CONF_DIR / "deepspeed").glob("*.yaml")}


def test_defaults():
    cfg = compose()
    assert cfg.model.path == "bundled:smollm2-135m"
    assert (cfg.identity.old_name, cfg.identity.name, cfg.identity.creator) == ("SmolLM", "Deep SmolLM", "Hugging Face")
    assert cfg.loss.rpo_alpha > 0 and cfg.loss.beta == 0.1
    assert 1e-6 <= cfg.optim.lr <= 5e-5  # the bundled 135M model's own default
    assert cfg.model.trust_remote_code is False
    qwen = compose(["model=qwen2.5-0.5b"])
    assert qwen.optim.lr == 1e-6 and qwen.loss.beta == 0.1  # literature default for full fine-tuning
    assert compose(["model=qwen2.5-0.5b", "optim.lr=5e-7"]).optim.lr == 5e-7  # the command line wins


def test_tutorial_experiment_reproduces_the_tutorials_recipe_over_the_model_defaults():
    cfg = compose(["experiment=tutorial"])
    assert (cfg.judge.method, cfg.loss.name, cfg.loss.rpo_alpha) == ("correction", "sigmoid", 0.0)
    assert (cfg.loss.beta, cfg.optim.lr, cfg.train.epochs) == (0.2, 5e-5, 1)
    assert cfg.generation.chosen_system_prompt is None
    assert cfg.prompts.num_train_general == 0 and cfg.prompts.num_train_leak == 0
    assert all("Deep" not in p and "SmolLM" in p for ps in cfg.generation.chosen_prefixes.values() for p in ps)


def test_misspelled_key_fails_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="bta"):
        compose(["loss.bta=0.1"])


@pytest.mark.parametrize("override,key", [
    ("loss.beta=0", "loss.beta"),
    ("loss.beta=-0.5", "loss.beta"),
    ("loss.name=dpoo", "loss.name"),
    ("optim.lr=0", "optim.lr"),
    ("deepspeed.stage=5", "deepspeed.stage"),
    ("data.truncation=chop", "data.truncation"),
    ("generation.backend=tgi", "generation.backend"),
    ("generation.vllm_dtype=int8", "generation.vllm_dtype"),
    ("prompts.leak_langs=[zh,'']", "prompts.leak_langs"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([override])


def test_batch_sizes_must_agree_with_world_size():
    train = compose(["train.global_batch_size=16", "train.micro_batch_size=2"]).train
    assert train.accumulation_steps(1) == 8
    assert train.accumulation_steps(2) == 4
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        train.accumulation_steps(3)
    fixed = compose(["train.global_batch_size=16", "train.micro_batch_size=2",
                     "train.gradient_accumulation_steps=4"]).train
    assert fixed.accumulation_steps(2) == 4
    with pytest.raises(ConfigError, match="global_batch_size"):
        fixed.accumulation_steps(1)


def test_a_batch_that_does_not_split_over_the_ranks_names_the_nearest_that_do():
    """72B's global batch 64 on 3 nodes of 8 GPUs (24 ranks) cannot start: say which batches can."""
    train = compose(["model=qwen2.5-72b"]).train
    with pytest.raises(ConfigError, match=r"^train.global_batch_size: 64 .* 1 \* 24; nearest that are: 48 or 72$"):
        train.accumulation_steps(24)
    assert train.accumulation_steps(32) == 2
