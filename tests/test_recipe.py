"""Recipes: every section read one way (dataclasses, "did you mean" for a typo), environments found by entry point
as rewards are, so that one outside vocalign runs with `vocalign train`."""

import json
import logging
import sys
import textwrap

import pytest

from vocalign.demo import DEMO_PROMPTS
from vocalign.eval.heldout import HeldoutSettings
from vocalign.launch.cli import main
from vocalign.launch.recipe import Environment, GLMTTSSettings, available_environments, heldout_rows_path, load_recipe, read_recipe

OUT_OF_TREE_MODULE = '''
from dataclasses import dataclass

from vocalign.launch.recipe import Environment, Run
from vocalign.rlhf.rollout import Scorer
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, build_toy_model, toy_prompts

BUILT = []


@dataclass
class FavouriteSettings:
    favourite_token: int
    num_prompts: int = 16


class FavouriteTokenScorer(Scorer):
    reward_names = ("favourite",)

    def __init__(self, token):
        self.token = token

    def score(self, rollouts):
        ids, mask = rollouts.completion_ids, rollouts.completion_mask.bool()
        return {"favourite": (((ids == self.token) & mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()}


def build(settings, recipe):
    BUILT.append(settings)
    toy = ToyConfig(num_prompts=settings.num_prompts)
    return Run(build_toy_model(toy), ToyEnv(toy), FavouriteTokenScorer(settings.favourite_token), toy_prompts(toy))


ENVIRONMENT = Environment(settings=FavouriteSettings, build=build)
'''


@pytest.fixture
def out_of_tree_package(tmp_path, monkeypatch):
    """An installed package (a module and its dist-info on sys.path) that registers environment `favourite`, and
    `not_an_environment` naming a function."""
    site = tmp_path / "site"
    (site / "favourite_env-0.1.dist-info").mkdir(parents=True)
    (site / "favourite_env.py").write_text(OUT_OF_TREE_MODULE)
    (site / "favourite_env-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: favourite-env\nVersion: 0.1\n")
    (site / "favourite_env-0.1.dist-info" / "entry_points.txt").write_text(textwrap.dedent("""\
        [vocalign.environments]
        favourite = favourite_env:ENVIRONMENT
        not_an_environment = favourite_env:build
        """))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "favourite_env", raising=False)
    yield
    sys.modules.pop("favourite_env", None)


def write_recipe(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def test_out_of_tree_environment_runs_with_vocalign_train(tmp_path, out_of_tree_package):
    assert {"glmtts", "toy", "favourite"} <= set(available_environments())
    recipe = write_recipe(tmp_path, {
        "env": {"name": "favourite", "favourite_token": 3, "num_prompts": 8},
        "trainer": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "prompts_per_step": 2, "num_generations": 4,
                    "micro_batch_size": 8, "max_completion_length": 4, "report_to": "none", "save_steps": 1000}})
    assert main(["train", str(recipe)]) == 0
    from favourite_env import BUILT, FavouriteSettings

    assert BUILT == [FavouriteSettings(favourite_token=3, num_prompts=8)]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1] and all(0 <= m["rewards/favourite/mean"] <= 1 for m in lines)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_environment_errors_name_the_fix(tmp_path, out_of_tree_package, caplog):
    with pytest.raises(ValueError, match=r"unknown environment env.name='favorite' \(did you mean 'favourite'\?\); "
                                         r"known: \['favourite', 'glmtts', 'not_an_environment', 'toy'\]"):
        read_recipe(write_recipe(tmp_path, {"env": {"name": "favorite"}}))
    with pytest.raises(ValueError, match=r"'not_an_environment' \(favourite_env:build\) is a function, not a "
                                         r"vocalign.launch.recipe.Environment"):
        read_recipe(write_recipe(tmp_path, {"env": {"name": "not_an_environment"}}))
    with pytest.raises(TypeError, match="Environment settings must be a dataclass"):
        Environment(settings=dict, build=lambda settings, recipe: None)
    with pytest.raises(ValueError, match=r"missing required key\(s\) env.favourite_token \(FavouriteSettings"):
        read_recipe(write_recipe(tmp_path, {"env": {"name": "favourite"}}))
    # from the command line: one line, exit code 2
    with caplog.at_level(logging.ERROR, logger="vocalign"):
        assert main(["train", str(write_recipe(tmp_path, {"env": {"name": "favourite", "favourite_tokn": 1}}))]) == 2
    assert "unknown key(s) in env: 'favourite_tokn' (did you mean 'favourite_token'?)" in caplog.text


def test_every_section_reads_the_same_way(tmp_path):
    """Top level, env (per environment), trainer and eval: an unknown key names the closest known one."""
    base = {"env": {"name": "glmtts", "ckpt": "tiny", "data": "demo"}}
    cases = [({"trainr": {}}, r"unknown key\(s\) in the top level: 'trainr' \(did you mean 'trainer'\?\)"),
             ({"env": {**base["env"], "flow_step": 2}}, r"in env: 'flow_step' \(did you mean 'flow_steps'\?\)"),
             ({"env": {"name": "toy", "vocab_sise": 8}}, r"in env: 'vocab_sise' \(did you mean 'vocab_size'\?\)"),
             ({"eval": {"seed": [0]}}, r"in eval: 'seed' \(did you mean 'seeds'\?\)"),
             ({"trainer": {"resample": {"ignor": []}}}, r"in trainer.resample: 'ignor' \(did you mean 'ignore'\?\)"),
             ({"env": {"name": "glmtts", "data": "demo"}}, r"missing required key\(s\) env.ckpt \(GLMTTSSettings"),
             ({"env": {**base["env"], "ckpt": None}}, r"missing required key\(s\) env.ckpt")]
    for change, message in cases:
        path = write_recipe(tmp_path, {**base, **change})
        with pytest.raises(ValueError, match=rf"{path}: .*{message}"):
            read_recipe(path)
    recipe, _, settings = read_recipe(write_recipe(tmp_path, {**base, "eval": {}}))
    assert settings == GLMTTSSettings(ckpt="tiny", data="demo") and recipe.eval == HeldoutSettings()


def test_eval_data_is_required_outside_the_demo(tmp_path):
    """`eval: {}` evaluates the demo's digit strings only when the checkpoint is the demo's."""
    path = write_recipe(tmp_path, {"env": {"name": "glmtts", "ckpt": str(tmp_path / "my-ckpt"), "data": "demo"},
                                   "eval": {}})
    with pytest.raises(ValueError, match="eval.data is required: a JSON-lines/parquet file of held-out prompt rows"):
        load_recipe(path)  # before anything is loaded: the checkpoint folder does not even exist
    assert not (tmp_path / "my-ckpt").exists()
    demo = GLMTTSSettings(ckpt="demo", data="demo")
    assert heldout_rows_path(demo, HeldoutSettings()) == DEMO_PROMPTS / "heldout.jsonl"
    mine = GLMTTSSettings(ckpt="ckpt", data="train.jsonl")
    assert heldout_rows_path(mine, HeldoutSettings(data="heldout.jsonl")).name == "heldout.jsonl"
    assert heldout_rows_path(mine, HeldoutSettings(data="demo")) == DEMO_PROMPTS / "heldout.jsonl"  # asked for


def test_flow_steps_is_refused_where_the_codec_has_no_flow(tmp_path):
    path = write_recipe(tmp_path, {"env": {"name": "glmtts", "ckpt": "demo", "data": "demo", "flow_steps": 10},
                                   "rewards": [{"name": "energy"}], "trainer": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(ValueError, match="env.flow_steps: .* decodes with the demo's mel-unit codec .* no "
                                         "flow-matching model, so the setting would be ignored; remove it"):
        load_recipe(path)


def test_a_prompt_column_no_reward_reads_is_refused_when_the_recipe_loads(tmp_path):
    """The recipe hands its reward plugins to the prompt loader, so a misspelt per-utterance column fails at load,
    not silently dropped (training prompts and held-out rows alike)."""
    row = json.loads((DEMO_PROMPTS / "train.jsonl").read_text().splitlines()[0])
    row["prompt_wav"] = str(DEMO_PROMPTS / row["prompt_wav"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({**row, "target_pich": 180.0}) + "\n")
    for data, heldout in ((str(prompts), "demo"), ("demo", str(prompts))):
        path = write_recipe(tmp_path, {"env": {"name": "glmtts", "ckpt": "demo", "data": data},
                                       "rewards": [{"name": "energy"}], "eval": {"data": heldout},
                                       "trainer": {"output_dir": str(tmp_path / "run")}})
        with pytest.raises(ValueError, match=r"prompts.jsonl: column\(s\) \['target_pich'\] are read by no reward plugin"):
            load_recipe(path)
