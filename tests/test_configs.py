"""Every shipped recipe parses: trainer keys are known, env and reward sections are well-formed."""

import re

import pytest

from vocalign.common.settings import apply_overrides, format_override, from_dict, load_yaml, load_yaml_list, parse_override
from vocalign.demo.build import DemoTTSConfig, load_demo_config
from vocalign.launch.recipe import GLMTTS_ENVIRONMENT, TOY_ENVIRONMENT, read_recipe
from vocalign.rlhf.config import GRPOConfig
from vocalign.sft.finetune import load_sft_config

from .conftest import REPO

NOT_GRPO = {"lora_voice.yaml", "demo_tts.yaml"}  # `vocalign sft` and `vocalign make-demo-tts` configs
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name not in NOT_GRPO)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_sections_are_valid(path):
    """Every section as `vocalign train` reads it, the env section by its environment's own dataclass."""
    recipe, environment, settings = read_recipe(path)
    assert isinstance(settings, environment.settings) and environment in (GLMTTS_ENVIRONMENT, TOY_ENVIRONMENT)
    names = [r["name"] for r in recipe.rewards] or ["hits", "sim"]  # the toy scores its own two rewards
    assert set(recipe.trainer.reward_weights) <= set(names)
    # as the GLM-TTS report, speaker similarity is left out of the flatness test (the default leaves out nothing)
    assert recipe.trainer.resample.ignore == ["sim"]


def test_published_recipe_values():
    config = from_dict(GRPOConfig, load_yaml(REPO / "configs" / "grpo_glmtts.yaml")["trainer"])
    assert (config.num_generations, config.learning_rate, config.adam_beta1, config.adam_beta2) == (8, 1e-6, 0.9, 0.95)
    assert config.schedule.epsilon == (0.2, 0.3) and config.schedule.epsilon_high == (0.3, 0.5)
    assert config.reward_weights == {"cer": 1.0, "sim": 0.1} and config.loss_type == "token_mean"


def test_reward_lists_and_sft_config_parse():
    assert [r["name"] for r in load_yaml_list(REPO / "configs" / "rewards" / "eval_cpu.yaml")] == ["cer", "sim"]
    assert load_sft_config(REPO / "configs" / "lora_voice.yaml").lora.r == 8


def test_demo_tts_config_writes_out_the_defaults():
    """configs/demo_tts.yaml says every setting in it is DemoTTSConfig's default: a changed default shows here."""
    assert load_demo_config(REPO / "configs" / "demo_tts.yaml") == DemoTTSConfig()


def test_one_override_syntax_for_recipes_sft_and_sweeps():
    """`section.key=value` with a YAML value everywhere; what a sweep writes for its runs reads back the same."""
    assert parse_override("trainer.max_steps=10") == ("trainer.max_steps", 10)
    assert parse_override("eval.seeds=[0, 1]") == ("eval.seeds", [0, 1])
    assert parse_override("epochs=3") == ("epochs", 3)  # a key at the top level has no section
    for value in ["runs/a b", "true", "1e-6", None, 0.1, [0, 1], {"sim": 0.1}, "x=y,z"]:
        assert parse_override(format_override("trainer.k", value)) == ("trainer.k", value)
    with pytest.raises(ValueError, match="must look like section.key=value"):
        parse_override("trainer.max_steps")
    recipe = apply_overrides({"trainer": {"beta": 0.0}}, [("trainer.beta", 0.1), ("trainer.resample.enabled", False)])
    assert recipe == {"trainer": {"beta": 0.1, "resample": {"enabled": False}}}
    with pytest.raises(ValueError, match="'beta' is not a section"):
        apply_overrides(recipe, [("trainer.beta.x", 1)])
    assert load_sft_config(REPO / "configs" / "lora_voice.yaml", {"epochs": 5, "lora.r": 16}).lora.r == 16


@pytest.mark.parametrize(("key", "value", "message"), [
    ("max_steps", "ten", "trainer.max_steps must be an integer, got 'ten'"),
    ("max_steps", True, "trainer.max_steps must be an integer, got True"),
    ("gradient_checkpointing", "yes", "trainer.gradient_checkpointing must be true or false, got 'yes'"),
    ("gradient_checkpointing", 1, "trainer.gradient_checkpointing must be true or false, got 1"),
    ("loss_type", 3, "trainer.loss_type must be a string, got 3"),
    ("beta", False, "trainer.beta must be a number, got False"),
    ("beta", "lots", "trainer.beta must be a number, got 'lots'"),
])
def test_a_scalar_of_the_wrong_type_is_refused_with_its_key_path(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        from_dict(GRPOConfig, {key: value}, "trainer")


def test_numbers_and_unions_read_as_before():
    config = from_dict(GRPOConfig, {"beta": 1, "learning_rate": "1e-6", "top_k": 5, "top_p": None,
                                    "resume": "force"}, "trainer")
    assert (config.beta, config.learning_rate, config.top_k, config.top_p, config.resume) == (1.0, 1e-6, 5, None,
                                                                                           "force")
    assert isinstance(config.beta, float)
    with pytest.raises(ValueError, match=re.escape("trainer.top_k must be an integer, got 2.5")):
        from_dict(GRPOConfig, {"top_k": 2.5}, "trainer")
