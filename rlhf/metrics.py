"""What a GRPO step reports, and where it goes: ``metrics.jsonl`` and the wandb run with its completion table.

Kept out of ``trainer.py`` so the loop says only *when* to log. Reward statistics are over the whole batch (every
process's rewards are gathered before the advantages, so every process computes the same figures); ``metrics.jsonl``
is written by the main process only, one line per logged step, and a resumed run first drops the lines of the steps
it will redo. The reward curves are plotted from ``metrics.jsonl`` after training (``vocalign.eval.plots``).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..common.settings import to_dict
from .advantages import flat_reward_mask, normalize_per_reward, scored_samples
from .config import GRPOConfig
from .loss import SurrogateTerms
from .rollout import Rollouts


def reward_metrics(rewards: torch.Tensor, invalid: torch.Tensor, advantages: torch.Tensor,
                   still_flat: torch.Tensor, reward_names: Sequence[str], weights: Sequence[float],
                   std_tolerance: float, eps: float) -> dict[str, float]:
    """Fused reward, advantage and per-reward statistics of rewards ``[P, G, K]`` (NaN: not scored) and advantages
    ``[P, G]``: each reward raw (mean, std over the samples it scored), normalised (mean |z|), how often it is flat
    within a group, and how many samples it found invalid (the policy's fault) or could not score (masked)."""
    scored = scored_samples(rewards)
    fused = (rewards * torch.tensor(weights, dtype=rewards.dtype)).sum(-1)[scored]
    flat_k = flat_reward_mask(rewards, std_tolerance)
    metrics = {
        "reward/mean": _mean(fused), "reward/std": _std(fused),
        "advantage/mean": advantages.mean().item(), "advantage/std": _std(advantages.flatten()),
        "advantage/min": advantages.min().item(), "advantage/max": advantages.max().item(),
        "resample/still_flat_frac": still_flat.float().mean().item(),
        "masked_frac": 1.0 - scored.float().mean().item(),
    }
    z = normalize_per_reward(rewards, std_tolerance=std_tolerance, eps=eps)
    for k, name in enumerate(reward_names):
        r = rewards[..., k]
        values = r[~torch.isnan(r)]
        metrics[f"rewards/{name}/mean"] = _mean(values)
        metrics[f"rewards/{name}/std"] = _std(values)
        metrics[f"rewards/{name}/normalized_abs_mean"] = z[..., k][scored].abs().mean().item() if scored.any() else 0.0
        metrics[f"rewards/{name}/flat_frac"] = flat_k[:, k].float().mean().item()
        metrics[f"rewards/{name}/invalid"] = float(invalid[..., k].sum())
        metrics[f"rewards/{name}/masked"] = float(torch.isnan(r).sum())
    return metrics


def _mean(x: torch.Tensor) -> float:
    return x.mean().item() if x.numel() else 0.0


def _std(x: torch.Tensor) -> float:
    return x.std().item() if x.numel() > 1 else 0.0


def check_unscored_share(rewards: torch.Tensor, invalid: torch.Tensor, reward_names: Sequence[str],
                         max_masked_frac: float, max_invalid_frac: float) -> None:
    """Stop the run when too many of a step's samples (all processes) could not be scored, or were invalid: a few
    are expected (a server refusing one utterance, a policy emitting silence early on); many mean a reward is
    broken or the policy has collapsed, and training on the rest would hide it."""
    def counts(per_reward: torch.Tensor) -> str:
        return ", ".join(f"{name}: {int(per_reward[..., k].sum())}" for k, name in enumerate(reward_names))

    total = rewards.shape[0] * rewards.shape[1]
    masked = torch.isnan(rewards)
    share = masked.any(-1).float().mean().item()
    if share > max_masked_frac:
        raise RuntimeError(
            f"{share:.0%} of this step's {total} samples could not be scored ({counts(masked)}), above "
            f"trainer.max_masked_frac={max_masked_frac}: a reward server or model is failing (its log says why). "
            "Fix it and resume from the last checkpoint, or raise max_masked_frac")
    share = invalid.any(-1).float().mean().item()
    if share > max_invalid_frac:
        raise RuntimeError(
            f"{share:.0%} of this step's {total} samples were invalid outputs of the policy ({counts(invalid)}: "
            f"empty, too long or without speech), above trainer.max_invalid_frac={max_invalid_frac}: the policy "
            "has degenerated; resume from an earlier checkpoint with a lower learning rate, or raise max_invalid_frac")


def batch_metrics(accelerator: Accelerator, rollouts: Rollouts, rounds: torch.Tensor, num_generations: int
                  ) -> dict[str, float]:
    """Completion length and resampling counts over every process's share of the batch (collective: every
    process must call it)."""
    device = accelerator.device
    lengths = accelerator.gather(rollouts.completion_mask.sum(-1).float().to(device))
    return {
        "completion_length/mean": lengths.mean().item(),
        "resample/groups": float(accelerator.gather(rounds.clamp(max=1).sum().to(device)).sum().item()),
        "resample/extra_generations": float(accelerator.gather(
            (rounds.sum() * num_generations).to(device)).sum().item()),
    }


def completion_metrics(accelerator: Accelerator, rollouts: Rollouts, rewards: torch.Tensor,
                       weights: Sequence[float]) -> dict[str, float]:
    """The sampler's token entropy, and how many completions hit the length cap with the fused reward they earned,
    over every process's share of the batch (collective). ``rewards``: the whole batch's ``[P, G, K]``."""
    device = accelerator.device
    mask = rollouts.completion_mask.float()
    out = {}
    if rollouts.entropies is not None:
        sums = accelerator.gather(torch.stack([(rollouts.entropies.float() * mask).sum(), mask.sum()]).to(device))
        sums = sums.view(-1, 2).sum(0)
        out["entropy"] = (sums[0] / sums[1].clamp(min=1)).item()
    truncated = accelerator.gather(rollouts.truncated.to(device)).cpu().bool()
    out["completions/truncated_frac"] = truncated.float().mean().item()
    fused = (rewards * torch.tensor(weights, dtype=rewards.dtype)).sum(-1).flatten()
    kept = truncated & ~torch.isnan(fused)
    if kept.any():
        out["completions/truncated_reward_mean"] = fused[kept].mean().item()
    return out


def peak_memory_gb(accelerator: Accelerator) -> float:
    """The most memory any process has held so far: CUDA's max allocated on GPUs, the max resident set on CPUs."""
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    else:  # Linux reports ru_maxrss in KiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return accelerator.gather(torch.tensor([peak], device=accelerator.device)).max().item()


class UpdateStats:
    """Loss, clip fractions, KL, gradient norm and how far the policy moved from the sampler (mean |ratio - 1| and
    the k3 estimate of KL(sampler || policy)) over one step's optimizer updates, each averaged over the
    ``num_iterations`` passes; the per-token figures are over the whole batch's tokens (all processes)."""

    def __init__(self, num_iterations: int, batch_tokens: float) -> None:
        self.num_iterations, self.batch_tokens = num_iterations, max(batch_tokens, 1.0)
        self.totals = {"loss": 0.0, "clip/low_frac": 0.0, "clip/high_frac": 0.0, "kl": 0.0, "grad_norm": 0.0,
                       "ratio/mean_abs_dev": 0.0, "kl_to_sampler": 0.0}

    def add(self, loss: torch.Tensor, terms: SurrogateTerms, mask: torch.Tensor) -> None:
        """One micro-batch: its loss and its completion tokens' clipping, KL and ratio."""
        m, tokens, passes = mask.float(), self.batch_tokens, self.num_iterations

        def token_sum(x: torch.Tensor) -> float:
            return (x.detach().float() * m).sum().item() / tokens / passes

        self.totals["loss"] += loss.item() / passes
        self.totals["clip/low_frac"] += token_sum(terms.clipped_low)
        self.totals["clip/high_frac"] += token_sum(terms.clipped_high)
        if terms.kl is not None:
            self.totals["kl"] += token_sum(terms.kl)
        ratio = terms.log_ratio.exp()
        self.totals["ratio/mean_abs_dev"] += token_sum((ratio - 1).abs())
        self.totals["kl_to_sampler"] += token_sum(ratio - 1 - terms.log_ratio)

    def add_grad_norm(self, norm: torch.Tensor | float | None) -> None:
        if norm is not None:  # DeepSpeed clips inside its step and may not report a norm
            self.totals["grad_norm"] += float(norm) / self.num_iterations

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """Summed over processes (collective); loss and gradient norm are then averaged over them."""
        reduced = accelerator.reduce(torch.tensor(list(self.totals.values()), device=accelerator.device),
                                     reduction="sum")
        summed = dict(zip(self.totals, reduced.tolist()))
        summed["loss"] /= accelerator.num_processes
        summed["grad_norm"] /= accelerator.num_processes
        return summed


class MetricsLog:
    """``metrics.jsonl`` in the run's folder and, with ``report_to: wandb``, the wandb run (offline unless
    ``WANDB_MODE`` says otherwise), whose id is kept in checkpoints so a resumed run continues the same one."""

    def __init__(self, accelerator: Accelerator, config: GRPOConfig) -> None:
        self.accelerator, self.config = accelerator, config
        self.output_dir = Path(config.output_dir)
        self.path = self.output_dir / "metrics.jsonl"

    @property
    def completions_wanted(self) -> int:
        """How many samples this process should describe for the completion table (0: no table)."""
        wandb = self.config.report_to == "wandb" and self.accelerator.is_main_process
        return self.config.log_completions if wandb else 0

    def truncate(self, step: int) -> None:
        """Drop metric lines of steps a resumed run will redo, so the file has each step once."""
        if not (self.accelerator.is_main_process and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] < step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def start(self, wandb_id: str | None) -> str | None:
        """Make the run's folder and open the wandb run (``wandb_id``: a resumed run's); returns the run's id."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.config.report_to != "wandb":
            return wandb_id
        os.environ.setdefault("WANDB_MODE", "offline")
        wandb_id = wandb_id or f"vocalign-{int(time.time())}"
        self.accelerator.init_trackers(
            self.config.wandb_project, config=to_dict(self.config),
            init_kwargs={"wandb": {"name": self.config.run_name, "dir": str(self.output_dir), "id": wandb_id,
                                   "resume": "allow"}})
        return wandb_id

    def write(self, step: int, metrics: dict[str, float], completions: list[dict[str, Any]]) -> None:
        """One step's metrics (and, for wandb, the completion table of ``completions``, see
        ``Scorer.sample_rows``)."""
        if self.config.report_to == "wandb":
            self.accelerator.log({**metrics, **completion_table(completions)}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def completion_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A wandb table of the rows' text and number columns (every column any row has), and the audio of the rows
    that have some (``audio`` and ``sample_rate``: a TTS environment's; a token environment's rows have none),
    captioned with the same columns; empty without rows."""
    if not rows:
        return {}
    import wandb

    columns = list(dict.fromkeys(k for row in rows for k in row if k not in ("audio", "sample_rate")))
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    clips = [wandb.Audio(row["audio"], sample_rate=row["sample_rate"],
                         caption=" | ".join(f"{c}: {row.get(c)}" for c in columns)) for row in rows if "audio" in row]
    return {"completions": table, **({"completions/audio": clips} if clips else {})}
