"""The GRPO training loop, readable top to bottom.

One step:
  1. take this step's prompts (a pure function of seed and step, so resuming needs only the step);
  2. sample ``num_generations`` completions per prompt with the current policy at the scheduled temperature,
     keeping the sampler's per-token log-probs (they are the "old" policy of the PPO ratio);
  3. score them with every reward, resample groups that are flat (within budget);
  4. hierarchical advantages over the whole batch (gathered across processes);
  5. ``num_iterations`` optimizer steps of the clipped surrogate with the scheduled clip bounds, accumulated over
     micro-batches, gradient-clipped;
  6. log, and checkpoint every ``save_steps``.

What happens before the first step (processes, LoRA, reference model, optimizer, DeepSpeed, resume) is in
``training_setup.py``; what a step reports and where it is written, in ``metrics.py``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from trl.models.utils import unwrap_model_for_generation

from .advantages import compute_advantages, rewards_to_tensor, scored_samples, token_advantages
from .batching import plan_micro_batches
from .checkpointing import save_checkpoint, save_final
from .config import GRPOConfig
from .loss import aggregate, clipped_surrogate, completion_logps
from .metrics import MetricsLog, UpdateStats, batch_metrics, check_unscored_share, completion_metrics, peak_memory_gb, reward_metrics
from .resampling import flat_groups, select_for_resampling
from .rollout import RolloutEnv, Rollouts, SamplingParams, Scorer
from .schedules import StepHyperparams
from .training_setup import prepare_training, reference_policy, resume

StepCallback = Callable[["GRPOTrainer", int], "dict[str, float] | None"]


class GRPOTrainer:
    """GRPO of ``model`` on ``prompts`` through any rollout environment and scorer (``rlhf/rollout.py``); after
    :meth:`train`, ``output_dir`` holds checkpoints, ``final/`` and ``metrics_path`` (``metrics.jsonl``).

    ``step_callbacks`` run on every process after each step's update, with the trainer and the number of steps done;
    what they return joins that step's metrics (e.g. a held-out evaluation every few steps). Each must be called by
    every process when it does collective work."""

    def __init__(self, model: torch.nn.Module, env: RolloutEnv, scorer: Scorer, prompts: Sequence[Any],
                 config: GRPOConfig, accelerator: Accelerator | None = None,
                 step_callbacks: Sequence[StepCallback] = ()) -> None:
        self.config, self.env, self.scorer, self.prompts = config, env, scorer, prompts
        self.step_callbacks = list(step_callbacks)
        self.reward_names = list(scorer.reward_names)
        self.reward_weights = config.weights_for(self.reward_names)
        unknown_ignored = sorted(set(config.resample.ignore) - set(self.reward_names))
        if unknown_ignored:
            raise ValueError(f"resample.ignore names {unknown_ignored}, which are not rewards {self.reward_names}")
        unknown_localised = sorted(set(config.token_reward_weights) - set(self.reward_names))
        if unknown_localised:
            raise ValueError(f"token_reward_weights names {unknown_localised}, which are not rewards "
                             f"{self.reward_names}")
        self.localised = list(config.token_reward_weights)
        if not prompts:
            raise ValueError("the prompt set is empty")
        self.setup = prepare_training(model, config, accelerator)
        self.accelerator, self.model = self.setup.accelerator, self.setup.model
        self.log = MetricsLog(self.accelerator, config)
        self.output_dir, self.metrics_path = self.log.output_dir, self.log.path
        self.step, self.wandb_id = 0, None
        self.last_rollouts: Rollouts | None = None

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        cfg = self.config
        if cfg.resume and (resumed := resume(self.setup, self.output_dir)) is not None:
            self.step, self.wandb_id = resumed
            self.log.truncate(self.step)
        self.wandb_id = self.log.start(self.wandb_id)
        constants = StepHyperparams(cfg.epsilon, cfg.epsilon_high, cfg.temperature)
        history = []
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="grpo",
                   disable=not self.accelerator.is_local_main_process)
        for step in bar:
            self.step = step
            metrics = self.train_step(self.prompts_for_step(step), cfg.schedule.at(step, cfg.max_steps, constants))
            self.step = step + 1
            for callback in self.step_callbacks:
                metrics.update(callback(self, self.step) or {})
            if step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                wanted = self.log.completions_wanted
                self.log.write(step, metrics, self.scorer.sample_rows(self.last_rollouts, wanted) if wanted else [])
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", clip=f"{metrics['clip/high_frac']:.2f}")
            history.append(metrics)
            if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                state = {"lr_scheduler": self.setup.lr_scheduler.state_dict(), "wandb_id": self.wandb_id}
                save_checkpoint(self.accelerator, self.output_dir, self.step, state, cfg.save_total_limit,
                                config=cfg)
        save_final(self.accelerator, self.model, self.output_dir / "final")
        for tracker in self.accelerator.trackers:  # the wandb run is complete; the processes stay together
            tracker.finish()
        return history

    def close(self) -> None:
        """End the process group, after :meth:`train` and whatever still needs the processes together (the
        held-out evaluation of ``final/``, shared out between them)."""
        self.accelerator.state.destroy_process_group()

    def prompts_for_step(self, step: int) -> list[Any]:
        """This process's prompts: a seeded permutation per epoch, global batches sliced by process index."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step = self.config.prompts_per_step
        start = step * per_step * world + rank * per_step
        chosen = []
        for position in range(start, start + per_step):
            epoch, offset = divmod(position, len(self.prompts))
            chosen.append(self.prompts[int(self._epoch_order(epoch)[offset])])
        return chosen

    @functools.lru_cache(maxsize=2)  # noqa: B019 -- one trainer per run; a step spans at most two epochs
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.config.seed + epoch))

    def train_step(self, prompts: Sequence[Any], hp: StepHyperparams) -> dict[str, float]:
        cfg, accelerator = self.config, self.accelerator
        sampling = SamplingParams(temperature=hp.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_completion_length,
                                  min_new_tokens=cfg.min_completion_length,
                                  synced_processes=self.setup.synced_generation)
        t0 = time.perf_counter()
        rollouts, rewards, invalid, spans, rounds, still_flat = self.generate_and_score(prompts, sampling)
        self.last_rollouts = rollouts
        t_rollout = time.perf_counter() - t0

        # advantages over the whole batch: gather every process's rewards, compute, keep our slice
        all_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()
        all_invalid = accelerator.gather(invalid.to(accelerator.device)).cpu().bool()
        all_still_flat = accelerator.gather(still_flat.to(accelerator.device)).cpu().bool()
        check_unscored_share(all_rewards, all_invalid, self.reward_names, cfg.max_masked_frac, cfg.max_invalid_frac)
        advantages = compute_advantages(
            all_rewards, self.reward_weights, normalization=cfg.normalization, scale_rewards=cfg.scale_rewards,
            std_tolerance=cfg.std_tolerance, eps=cfg.advantage_eps)
        advantages[all_still_flat] = 0.0  # a group still flat after resampling carries no signal
        mine = slice(accelerator.process_index * len(prompts), (accelerator.process_index + 1) * len(prompts))
        scored = scored_samples(all_rewards)[mine].reshape(-1)
        my_advantages = advantages[mine].reshape(-1).float()
        credit_metrics = {}
        if self.localised:  # groups never span processes, so the per-token term is computed where they are
            my_advantages, credit_metrics = self.localised_advantages(
                rollouts, spans, advantages[mine], scored, all_still_flat[mine])

        t1 = time.perf_counter()
        stats = self.optimise(rollouts, my_advantages, scored, hp)
        t_update = time.perf_counter() - t1

        return {
            **reward_metrics(all_rewards, all_invalid, advantages, all_still_flat, self.reward_names,
                             self.reward_weights, cfg.std_tolerance, cfg.advantage_eps),
            **stats, **batch_metrics(accelerator, rollouts, rounds, cfg.num_generations),
            **completion_metrics(accelerator, rollouts, all_rewards, self.reward_weights), **credit_metrics,
            "schedule/epsilon": hp.epsilon, "schedule/epsilon_high": hp.epsilon_high,
            "schedule/temperature": hp.temperature, "lr": self.setup.lr_scheduler.get_last_lr()[0],
            "time/rollout_s": t_rollout, "time/update_s": t_update, "memory/peak_gb": peak_memory_gb(accelerator),
            **self.env.metrics(), **self.scorer.metrics(),  # their own figures: stage timings, server failures
        }

    # ------------------------------------------------------------------ rollouts and rewards
    def generate_and_score(
        self, prompts: Sequence[Any], sampling: SamplingParams
    ) -> tuple[Rollouts, torch.Tensor, torch.Tensor, dict[str, list[Any]], torch.Tensor, torch.Tensor]:
        """Rollouts, rewards ``[P, G, K]`` (NaN where a sample could not be scored), which of them are invalid and
        each localised reward's spans per sample, with flat groups resampled within budget.

        Returns also how often each prompt was resampled and which groups are still flat.
        """
        cfg, res = self.config, self.config.resample
        g = cfg.num_generations
        rollouts = self._rollout(prompts, sampling)
        rewards, invalid, spans = self._score(rollouts)
        rounds = torch.zeros(len(prompts), dtype=torch.long)
        budget = res.max_total if res.max_total is not None else len(prompts) * g

        def is_flat() -> torch.Tensor:
            return flat_groups(rewards, self.reward_names, res.ignore, cfg.std_tolerance)

        while res.enabled:
            chosen = select_for_resampling(is_flat(), rounds, max_rounds=res.max_rounds, budget_left=budget,
                                           num_generations=g)
            if not self._any_process(bool(chosen)):
                break
            if not chosen:
                # ZeRO-3 sampling is collective: keep step with the processes that do resample, discard the result
                self._rollout(prompts[:1], sampling)
                continue
            fresh = self._rollout([prompts[i] for i in chosen], sampling)
            rollouts = rollouts.replace_groups(chosen, fresh)
            rewards[chosen], invalid[chosen], fresh_spans = self._score(fresh)
            for name, per_sample in fresh_spans.items():
                for k, i in enumerate(chosen):
                    spans[name][i * g:(i + 1) * g] = per_sample[k * g:(k + 1) * g]
            rounds[chosen] += 1
            budget -= len(chosen) * g
        still_flat = is_flat() if res.enabled else torch.zeros(len(prompts), dtype=torch.bool)
        return rollouts, rewards, invalid, spans, rounds, still_flat

    def _rollout(self, prompts: Sequence[Any], sampling: SamplingParams) -> Rollouts:
        with unwrap_model_for_generation(self.model, self.accelerator) as policy:
            was_training = policy.training
            policy.eval()
            try:
                return self.env.rollout(policy, prompts, self.config.num_generations, sampling)
            finally:
                policy.train(was_training)

    def _score(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[Any]]]:
        """Rewards ``[P, G, K]``, the invalid flags ``[P, G, K]`` and the localised rewards' spans per sample that
        the scorer gave (see ``rollout.Scores``)."""
        scored = self.scorer.score(rollouts)
        values, flags, spans = ((scored, {}, {}) if isinstance(scored, Mapping)
                                else (scored.rewards, scored.invalid, getattr(scored, "spans", {})))
        rewards = rewards_to_tensor(values, self.reward_names, rollouts.num_generations)
        invalid = torch.zeros(rewards.shape, dtype=torch.bool)
        for k, name in enumerate(self.reward_names):
            if name in flags:
                invalid[..., k] = torch.tensor([bool(f) for f in flags[name]]).view(rewards.shape[:2])
        missing = [name for name in self.localised if name not in spans]
        if missing:
            raise ValueError(f"token_reward_weights names {missing}, but the scorer returned no spans for them; "
                             "only rewards that say where they found errors (e.g. cer) can give token-level credit")
        return rewards, invalid, {name: list(spans[name]) for name in self.localised}

    def localised_advantages(self, rollouts: Rollouts, spans: Mapping[str, Sequence[Any]],
                             advantages: torch.Tensor, scored: torch.Tensor, still_flat: torch.Tensor
                             ) -> tuple[torch.Tensor, dict[str, float]]:
        """This process's per-token advantages ``[N, C]`` (see ``advantages.token_advantages``) and how much of
        the batch the localised rewards reached. Masked samples and groups still flat keep no token term."""
        p, g = advantages.shape
        keep = (scored.view(p, g) & ~still_flat.unsqueeze(1)).unsqueeze(-1)
        mask = rollouts.completion_mask.bool().view(p, g, -1) & keep
        values, touched = [], []
        for name in self.localised:
            v, t = self.env.localise(rollouts, spans[name])
            values.append(v.double().view(p, g, -1))
            touched.append(t.bool().view(p, g, -1) & mask)
        weights = [self.config.token_reward_weights[name] for name in self.localised]
        cfg = self.config
        per_token, terms = token_advantages(advantages, values, touched, weights,
                                            composition=cfg.token_credit_composition,
                                            std_tolerance=cfg.std_tolerance, eps=cfg.advantage_eps)
        per_token = per_token.masked_fill(~rollouts.completion_mask.bool().view(p, g, -1), 0.0)
        sums = [float(rollouts.completion_mask.sum())]  # the batch's tokens, then per reward: touched, |term|
        for term, t in zip(terms, touched):
            sums += [float(t.sum()), term[t].abs().sum().item()]
        totals = self.accelerator.reduce(torch.tensor(sums, device=self.accelerator.device), reduction="sum").tolist()
        metrics = {}
        for k, name in enumerate(self.localised):
            touched_tokens, magnitude = totals[1 + 2 * k], totals[2 + 2 * k]
            metrics[f"token_credit/{name}/touched_frac"] = touched_tokens / max(totals[0], 1.0)
            metrics[f"token_credit/{name}/abs_mean"] = magnitude / max(touched_tokens, 1.0)
        return per_token.reshape(p * g, -1).float(), metrics

    def _any_process(self, flag: bool) -> bool:
        if not self.setup.synced_generation:
            return flag
        flags = self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device))
        return bool(flags.sum().item() > 0)

    # ------------------------------------------------------------------ the update
    def optimise(self, rollouts: Rollouts, advantages: torch.Tensor, scored: torch.Tensor,
                 hp: StepHyperparams) -> dict[str, float]:
        """``num_iterations`` optimizer steps on this process's samples, with advantages per sample ``[N]`` or per
        token ``[N, C]`` (token-level credit). ``scored`` ``[N]`` says which samples every
        reward scored; the others (and, with ``mask_truncated_completions``, those cut at the length cap) take no
        part in the loss or its normaliser."""
        cfg, accelerator, device = self.config, self.accelerator, self.accelerator.device
        keep = scored.bool() & ~rollouts.truncated if cfg.mask_truncated_completions else scored.bool()
        mask = (rollouts.completion_mask * keep.unsqueeze(1)).to(device)
        prompt_ids, prompt_mask = rollouts.prompt_ids.to(device), rollouts.prompt_mask.to(device)
        completion_ids, old_logps = rollouts.completion_ids.to(device), rollouts.old_logps.to(device)
        advantages = advantages.to(device)

        def row_advantages(rows: torch.Tensor, width: int) -> torch.Tensor:  # [B] or, per token, [B, width]
            return advantages[rows] if advantages.dim() == 1 else advantages[rows, :width]

        plan = plan_micro_batches(rollouts.prompt_mask, rollouts.completion_mask, cfg.micro_batch_size,
                                  cfg.group_by_length)

        def inputs(mb):  # one micro-batch's rows, trimmed to its own widest prompt and completion
            ids = torch.cat([prompt_ids[mb.rows, mb.prompt_start:], completion_ids[mb.rows, :mb.width]], 1)
            attention = torch.cat([prompt_mask[mb.rows, mb.prompt_start:],
                                   rollouts.completion_mask[mb.rows, :mb.width].to(device)], 1)
            return ids, attention

        ref_logps = None
        if cfg.beta > 0:  # scored at the policy's temperature so that k3 compares like with like (as TRL does)
            with torch.no_grad(), reference_policy(self.setup) as ref:
                ref_logps = [completion_logps(ref, *inputs(mb), mb.width, hp.temperature) for mb in plan]
        # Normalisers of the whole batch. DDP averages gradients over processes, so token_mean divides by the
        # global token count over the process count, exactly as TRL does.
        num_tokens = accelerator.gather(mask.sum().float()).sum().item() / accelerator.num_processes
        num_sequences = accelerator.gather(keep.sum().float().to(device)).sum().item() / accelerator.num_processes
        stats = UpdateStats(cfg.num_iterations, num_tokens * accelerator.num_processes)
        self.model.train()
        for _ in range(cfg.num_iterations):
            for k in torch.randperm(len(plan)).tolist():
                mb = plan[k]
                rows, width = mb.rows, mb.width
                with accelerator.accumulate(self.model):
                    logps = completion_logps(self.model, *inputs(mb), width, hp.temperature)
                    terms = clipped_surrogate(
                        logps, old_logps[rows, :width], row_advantages(rows, width), epsilon_low=hp.epsilon,
                        epsilon_high=hp.epsilon_high, beta=cfg.beta,
                        ref_logps=None if ref_logps is None else ref_logps[k])
                    loss = aggregate(terms.per_token_loss, mask[rows, :width], cfg.loss_type, num_tokens=num_tokens,
                                     num_sequences=num_sequences, max_completion_length=cfg.max_completion_length)
                    # accelerate divides by the accumulation count; our normaliser already covers the whole batch
                    accelerator.backward(loss * self.setup.accumulation_steps)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        stats.add_grad_norm(accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
                    self.setup.optimizer.step()
                    self.setup.optimizer.zero_grad()
                stats.add(loss, terms, mask[rows, :width])
            self.setup.lr_scheduler.step()
        return stats.reduce(accelerator)
