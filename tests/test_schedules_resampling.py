import pytest
import torch

from vocalign.rlhf.resampling import ResampleConfig, flat_groups, select_for_resampling
from vocalign.rlhf.schedules import Schedule, StepHyperparams, linear


def test_linear_by_hand():
    assert linear(0.2, 0.3, 0, 1000) == pytest.approx(0.2)
    assert linear(0.2, 0.3, 250, 1000) == pytest.approx(0.225)
    assert linear(0.3, 0.5, 500, 1000) == pytest.approx(0.4)
    assert linear(0.3, 0.5, 1000, 1000) == pytest.approx(0.5)
    assert linear(0.3, 0.5, 5000, 1000) == pytest.approx(0.5)  # held after the ramp
    assert linear(1.0, 0.7, 0, 0) == pytest.approx(0.7)


def test_schedule_moves_only_what_is_scheduled():
    schedule = Schedule(epsilon=[0.2, 0.3], epsilon_high=[0.3, 0.5])
    constants = StepHyperparams(epsilon=0.1, epsilon_high=0.2, temperature=0.8)
    at_half = schedule.at(50, 100, constants)
    assert at_half.epsilon == pytest.approx(0.25)
    assert at_half.epsilon_high == pytest.approx(0.4)
    assert at_half.temperature == 0.8
    ramp = Schedule(temperature=[1.0, 0.6], steps=10)
    assert ramp.at(5, 100, constants).temperature == pytest.approx(0.8)
    assert ramp.at(20, 100, constants).temperature == pytest.approx(0.6)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": [1.0, 0.0]}, "temperature"),
    ({"epsilon": [0.2, 1.2]}, "lower clip bound"),
    ({"epsilon_high": [0.2]}, r"\[start, end\]"),
])
def test_schedule_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def test_flat_groups_ignore_sim_by_default_name():
    # prompt 0: cer flat, sim varies -> flat (sim ignored); prompt 1: cer varies -> not flat; prompt 2: all flat
    r = torch.tensor([
        [[1.0, 0.1], [1.0, 0.9]],
        [[0.0, 0.5], [1.0, 0.5]],
        [[0.4, 0.3], [0.4, 0.3]],
    ])
    assert flat_groups(r, ["cer", "sim"], ignore=["sim"]).tolist() == [True, False, True]
    assert flat_groups(r, ["cer", "sim"], ignore=[]).tolist() == [False, False, True]
    assert flat_groups(r, ["cer", "sim"], ignore=["cer", "sim"]).tolist() == [False, False, False]


def test_select_for_resampling_respects_rounds_and_budget():
    flat = torch.tensor([True, False, True, True])
    rounds = torch.tensor([0, 0, 3, 1])
    # prompt 2 used its 3 rounds; budget of 8 generations with G=4 affords two prompts
    assert select_for_resampling(flat, rounds, max_rounds=3, budget_left=8, num_generations=4) == [0, 3]
    assert select_for_resampling(flat, rounds, max_rounds=3, budget_left=7, num_generations=4) == [0]
    assert select_for_resampling(flat, rounds, max_rounds=3, budget_left=0, num_generations=4) == []
    assert select_for_resampling(flat, rounds, max_rounds=1, budget_left=99, num_generations=4) == [0]


def test_resample_config_validation():
    with pytest.raises(ValueError, match="max_rounds"):
        ResampleConfig(max_rounds=-1)
    assert ResampleConfig().ignore == [] and ResampleConfig().max_rounds == 3  # no reward name fits every environment
