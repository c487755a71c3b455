"""Advantages against values worked out by hand (eps=0 so the numbers are exact)."""

import math

import pytest
import torch

from vocalign.rlhf.advantages import compute_advantages, normalize_per_reward, rewards_to_tensor, scored_samples


def rewards(*columns):
    """[1, G, K] from K per-sample lists."""
    return torch.tensor(list(zip(*columns)), dtype=torch.float64).unsqueeze(0)


def test_one_reward_flat_other_varying_hierarchical():
    # cer varies: mean 0.5, unbiased std sqrt(1/3) -> z = +-0.5 / 0.57735 = +-0.866025; sim flat -> contributes 0.
    # fused = +-0.866025 * 1.0, its group std is exactly 1, so A = fused.
    r = rewards([1, 0, 0, 1], [0.7, 0.7, 0.7, 0.7])
    adv = compute_advantages(r, [1.0, 0.1], eps=0.0)
    expected = torch.tensor([[0.8660254, -0.8660254, -0.8660254, 0.8660254]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_two_varying_rewards_hierarchical_by_hand():
    # r1 = [0,1,2,3]: std sqrt(5/3)=1.290994 -> z1 = [-1.161895, -0.387298, 0.387298, 1.161895]
    # r2 = [3,3,0,0]: std sqrt(3) -> z2 = [0.866025, 0.866025, -0.866025, -0.866025]
    # fused (w = 1, 0.5) = [-0.728882, 0.045715, -0.045715, 0.728882], std 0.596300
    r = rewards([0, 1, 2, 3], [3, 3, 0, 0])
    adv = compute_advantages(r, [1.0, 0.5], eps=0.0)
    expected = torch.tensor([[-1.222343, 0.076663, -0.076663, 1.222343]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_hierarchical_is_not_dominated_by_scale():
    # Multiplying a reward by 1000 changes nothing after per-reward normalisation ...
    small, large = rewards([0, 1, 2, 3], [3, 3, 0, 0]), rewards([0, 1, 2, 3], [3000, 3000, 0, 0])
    torch.testing.assert_close(compute_advantages(small, [1, 0.5], eps=0.0), compute_advantages(large, [1, 0.5], eps=0.0))
    # ... while summing first lets the wide reward take over.
    assert not torch.allclose(compute_advantages(small, [1, 0.5], normalization="sum_then_normalize"),
                              compute_advantages(large, [1, 0.5], normalization="sum_then_normalize"))


def test_sum_then_normalize_by_hand():
    # f = r1 + 0.5 r2 = [1.5, 2.5, 2, 3], mean 2.25, std sqrt(1.25/3) = 0.645497
    r = rewards([0, 1, 2, 3], [3, 3, 0, 0])
    adv = compute_advantages(r, [1.0, 0.5], normalization="sum_then_normalize", eps=0.0)
    expected = torch.tensor([[-1.161895, 0.387298, -0.387298, 1.161895]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_no_std_scaling_only_centres():
    # z1 = r1 - 1.5 = [-1.5, -0.5, 0.5, 1.5]; z2 = r2 - 1.5 = [1.5, 1.5, -1.5, -1.5]
    # fused = z1 + 0.5 z2 = [-0.75, 0.25, -0.25, 0.75] (already centred)
    r = rewards([0, 1, 2, 3], [3, 3, 0, 0])
    adv = compute_advantages(r, [1.0, 0.5], scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor([[-0.75, 0.25, -0.25, 0.75]], dtype=torch.float64))


def test_batch_level_renormalisation_by_hand():
    # group 0 fuses to +-0.866025, group 1 is flat (0). Batch std over the 8 values = sqrt(3/7) = 0.654654,
    # so group 0 becomes +-1.322876 instead of +-0.866025 at group level.
    r = torch.cat([rewards([1, 0, 0, 1]), rewards([0.5, 0.5, 0.5, 0.5])])
    batch = compute_advantages(r, [1.0], scale_rewards="batch", eps=0.0)
    group = compute_advantages(r, [1.0], scale_rewards="group", eps=0.0)
    torch.testing.assert_close(batch[0], torch.tensor([1.322876, -1.322876, -1.322876, 1.322876],
                                                      dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(group[0], torch.tensor([0.866025, -0.866025, -0.866025, 0.866025],
                                                      dtype=torch.float64), atol=1e-6, rtol=0)
    assert batch[1].abs().max() == 0 and group[1].abs().max() == 0


def test_all_flat_gives_zero():
    r = rewards([0.3, 0.3, 0.3], [1.0, 1.0, 1.0])
    for normalization in ("hierarchical", "sum_then_normalize"):
        for scale in ("group", "batch", "none"):
            adv = compute_advantages(r, [1, 1], normalization=normalization, scale_rewards=scale)
            assert adv.abs().max() == 0, (normalization, scale)


def test_single_generation_gives_zero_not_nan():
    r = torch.tensor([[[0.9, 0.1]], [[0.2, 0.4]]], dtype=torch.float64)  # G = 1
    adv = compute_advantages(r, [1, 1])
    assert adv.shape == (2, 1) and torch.equal(adv, torch.zeros(2, 1, dtype=torch.float64))


def test_near_flat_reward_below_tolerance_contributes_nothing():
    r = rewards([1, 0, 0, 1], [0.5, 0.5 + 1e-9, 0.5, 0.5])
    z = normalize_per_reward(r, std_tolerance=1e-6)
    assert z[..., 1].abs().max() == 0 and z[..., 0].abs().max() > 0


@pytest.mark.parametrize("missing", [float("nan"), None])
def test_a_missing_reward_becomes_nan_and_marks_its_sample_unscored(missing):
    t = rewards_to_tensor({"cer": [0.1, 0.2, missing, 0.4], "sim": [0.5] * 4}, ["cer", "sim"], 2)
    assert math.isnan(t[1, 0, 0]) and scored_samples(t).tolist() == [[True, True], [False, True]]


def test_infinite_rewards_are_rejected():
    with pytest.raises(ValueError, match=r"reward 'cer' has infinite values at samples \[2\]"):
        rewards_to_tensor({"cer": [0.1, 0.2, math.inf, 0.4], "sim": [0.5] * 4}, ["cer", "sim"], 2)


@pytest.mark.parametrize("normalization", ["hierarchical", "sum_then_normalize"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_a_masked_sample_is_as_if_absent_from_its_group(normalization, scale_rewards):
    # group 0 has a sample no reward could score; its advantage is 0 and the others' are those of the group
    # without it. Group 1 is whole, so with "batch" the batch statistics also leave the masked sample out.
    full = torch.tensor([[[0.0, 1.0], [1.0, 3.0], [2.0, 0.0], [9.0, 9.0]],
                         [[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [2.0, 2.0]]], dtype=torch.float64)
    masked = full.clone()
    masked[0, 3] = float("nan")
    settings = dict(normalization=normalization, scale_rewards=scale_rewards, eps=0.0)
    adv = compute_advantages(masked, [1.0, 0.5], **settings)
    assert adv[0, 3] == 0
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    if scale_rewards == "batch":  # statistics of the batch's 7 scored samples, worked out group by group
        if normalization == "hierarchical":  # z-scores per group, fused, then the batch's mean and std
            fused = torch.cat([normalize_per_reward(g.unsqueeze(0), eps=0.0)[0] @ w for g in (full[0, :3], full[1])])
            expected = (fused - fused.mean()) / fused.std()
        else:  # centred on each group's mean, scaled by the std of the batch's fused rewards (as TRL)
            fused = [g @ w for g in (full[0, :3], full[1])]
            expected = torch.cat([f - f.mean() for f in fused]) / torch.cat(fused).std()
        torch.testing.assert_close(torch.cat([adv[0, :3], adv[1]]), expected)
        return
    expected0 = compute_advantages(full[:1, :3], [1.0, 0.5], **settings)[0]
    expected1 = compute_advantages(full[1:], [1.0, 0.5], **settings)[0]
    torch.testing.assert_close(adv[0, :3], expected0)
    torch.testing.assert_close(adv[1], expected1)


def test_masked_group_by_hand():
    # rewards [1, 0, NaN, 0.5] with one reward: scored [1, 0, 0.5], mean 0.5, unbiased std 0.5 -> [1, -1, 0, 0]
    r = rewards([1.0, 0.0, float("nan"), 0.5])
    adv = compute_advantages(r, [1.0], eps=0.0)
    assert adv.tolist() == [[1.0, -1.0, 0.0, 0.0]]


def test_rewards_to_tensor_shapes_and_errors():
    t = rewards_to_tensor({"a": [1, 2, 3, 4], "b": [5, 6, 7, 8]}, ["a", "b"], 2)
    assert t.shape == (2, 2, 2) and t[1, 0].tolist() == [3, 7]
    with pytest.raises(ValueError, match="missing from the scores"):
        rewards_to_tensor({"a": [1, 2]}, ["a", "b"], 2)
    with pytest.raises(ValueError, match="groups of num_generations=3"):
        rewards_to_tensor({"a": [1, 2, 3, 4]}, ["a"], 3)


def test_compute_advantages_rejects_bad_arguments():
    r = rewards([0, 1], [1, 0])
    with pytest.raises(ValueError, match="2 rewards"):
        compute_advantages(r, [1.0])
    with pytest.raises(ValueError, match="inf"):
        compute_advantages(torch.full((1, 2, 1), float("inf")), [1.0])
    with pytest.raises(ValueError, match="normalization"):
        compute_advantages(r, [1, 1], normalization="mean")
