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
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler
from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation

from .advantages import compute_advantages, flat_reward_mask, normalize_per_reward, rewards_to_tensor
from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import GRPOConfig, to_dict, wrap_lora
from .loss import aggregate, clipped_surrogate, completion_logps
from .resampling import flat_groups, select_for_resampling
from .rollout import RolloutEnv, Rollouts, SamplingParams, Scorer
from .schedules import StepHyperparams

logger = logging.getLogger(__name__)


class GRPOTrainer:
    def __init__(
        self,
        model: torch.nn.Module,
        env: RolloutEnv,
        scorer: Scorer,
        prompts: Sequence[Any],
        config: GRPOConfig,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.config = config
        self.env, self.scorer, self.prompts = env, scorer, prompts
        self.reward_names = list(scorer.reward_names)
        self.reward_weights = config.weights_for(self.reward_names)
        unknown_ignored = sorted(set(config.resample.ignore) - set(self.reward_names))
        if unknown_ignored:
            raise ValueError(f"resample.ignore names {unknown_ignored}, which are not rewards {self.reward_names}")
        if not prompts:
            raise ValueError("the prompt set is empty")

        samples_per_step = config.prompts_per_step * config.num_generations
        self.accumulation_steps = math.ceil(samples_per_step / config.micro_batch_size)
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_steps=self.accumulation_steps,
            mixed_precision="bf16" if config.bf16 else "no",
            log_with="wandb" if config.report_to == "wandb" else None,
            project_dir=config.output_dir,
        )
        if self.accelerator.gradient_accumulation_steps != self.accumulation_steps:
            raise ValueError(
                f"the Accelerator accumulates {self.accelerator.gradient_accumulation_steps} micro-batches but a step "
                f"has {self.accumulation_steps} (prompts_per_step * num_generations / micro_batch_size); "
                "leave gradient_accumulation_steps to the trainer (\"auto\" in DeepSpeed configs)")
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = config.micro_batch_size
            ds_config["gradient_accumulation_steps"] = self.accumulation_steps
            ds_config["gradient_clipping"] = config.max_grad_norm
        set_seed(config.seed, device_specific=True)

        if config.lora is not None:
            model = wrap_lora(model, config.lora)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # The reference for the KL term: the adapter switched off with LoRA, otherwise a frozen copy.
        self.ref_model = None
        if config.beta > 0 and config.lora is None:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.ref_model is not None and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed needs its own inference engine for a second model (sharded too under ZeRO-3)
            self.ref_model = prepare_deepspeed(self.ref_model, self.accelerator)
        elif self.ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)
        # Stepped once per optimizer step by us (not prepared): its position is part of our JSON state.
        self.lr_scheduler = get_scheduler(config.lr_scheduler_type, self.optimizer, config.warmup_steps,
                                          config.max_steps * config.num_iterations)
        self.synced_generation = (
            self.accelerator.distributed_type == DistributedType.DEEPSPEED
            and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

        logger.info("%d process(es), %s, %d micro-batches of %d per optimizer step",
                    self.accelerator.num_processes, self.accelerator.distributed_type.value,
                    self.accumulation_steps, config.micro_batch_size)
        self.step = 0
        self.output_dir = Path(config.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.wandb_id: str | None = None
        self.last_rollouts: Rollouts | None = None

    # ------------------------------------------------------------------ setup helpers
    def _maybe_resume(self) -> None:
        if not self.config.resume:
            return
        path = latest_checkpoint(self.output_dir)
        if path is None:
            return
        state = load_checkpoint(self.accelerator, path)
        self.step = state["step"]
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.wandb_id = state.get("wandb_id")
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines of steps the resumed run will redo, so the file has each step once."""
        if not (self.accelerator.is_main_process and self.metrics_path.is_file()):
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line and json.loads(line)["step"] < step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _init_tracking(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.config.report_to != "wandb":
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        self.wandb_id = self.wandb_id or f"vocalign-{int(time.time())}"
        self.accelerator.init_trackers(
            self.config.wandb_project, config=to_dict(self.config),
            init_kwargs={"wandb": {"name": self.config.run_name, "dir": str(self.output_dir), "id": self.wandb_id,
                                   "resume": "allow"}})

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        self._maybe_resume()
        self._init_tracking()
        cfg = self.config
        constants = StepHyperparams(cfg.epsilon, cfg.epsilon_high, cfg.temperature)
        history = []
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="grpo",
                   disable=not self.accelerator.is_local_main_process)
        for step in bar:
            self.step = step
            hp = cfg.schedule.at(step, cfg.max_steps, constants)
            metrics = self.train_step(self.prompts_for_step(step), hp)
            self.step = step + 1
            if step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                self._log(step, metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", clip=f"{metrics['clip/high_frac']:.2f}")
            history.append(metrics)
            if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                self.save()
        self.save_model(self.output_dir / "final")
        self.accelerator.end_training()
        return history

    def prompts_for_step(self, step: int) -> list[Any]:
        """This process's prompts: a seeded permutation per epoch, global batches sliced by process index."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step = self.config.prompts_per_step
        global_batch = per_step * world
        start = step * global_batch + rank * per_step
        chosen = []
        for position in range(start, start + per_step):
            epoch, offset = divmod(position, len(self.prompts))
            chosen.append(self.prompts[int(self._epoch_order(epoch)[offset])])
        return chosen

    @functools.lru_cache(maxsize=2)  # noqa: B019 -- one trainer per run; a step spans at most two epochs
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.config.seed + epoch))

    def train_step(self, prompts: Sequence[Any], hp: StepHyperparams) -> dict[str, float]:
        cfg = self.config
        sampling = SamplingParams(hp.temperature, cfg.top_k, cfg.top_p, cfg.max_completion_length,
                                  cfg.min_completion_length)
        t0 = time.perf_counter()
        rollouts, rewards, rounds, still_flat = self.generate_and_score(prompts, sampling)
        self.last_rollouts = rollouts
        t_rollout = time.perf_counter() - t0

        # advantages over the whole batch: gather every process's rewards, compute, keep our slice
        all_rewards = self.accelerator.gather(rewards.to(self.accelerator.device)).cpu()
        all_still_flat = self.accelerator.gather(still_flat.to(self.accelerator.device)).cpu()
        advantages = compute_advantages(
            all_rewards, self.reward_weights, normalization=cfg.normalization, scale_rewards=cfg.scale_rewards,
            std_tolerance=cfg.std_tolerance, eps=cfg.advantage_eps)
        advantages[all_still_flat] = 0.0  # a group still flat after resampling carries no signal
        mine = slice(self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) * len(prompts))
        local_advantages = advantages[mine].reshape(-1).float()

        t1 = time.perf_counter()
        stats = self.optimise(rollouts, local_advantages, hp)
        t_update = time.perf_counter() - t1

        metrics = self._reward_metrics(all_rewards, advantages, all_still_flat)
        metrics.update(stats)
        lengths = self.accelerator.gather(rollouts.completion_mask.sum(-1).float().to(self.accelerator.device))
        metrics.update({
            "completion_length/mean": lengths.mean().item(),
            "resample/groups": float(self.accelerator.gather(rounds.clamp(max=1).sum().to(
                self.accelerator.device)).sum().item()),
            "resample/extra_generations": float(self.accelerator.gather(
                (rounds.sum() * cfg.num_generations).to(self.accelerator.device)).sum().item()),
            "schedule/epsilon": hp.epsilon, "schedule/epsilon_high": hp.epsilon_high,
            "schedule/temperature": hp.temperature, "lr": self.lr_scheduler.get_last_lr()[0],
            "time/rollout_s": t_rollout, "time/update_s": t_update,
        })
        # the environment's and the scorer's own figures (stage timings, reward-server failures)
        metrics.update(self.env.metrics())
        metrics.update(self.scorer.metrics())
        return metrics

    # ------------------------------------------------------------------ rollouts and rewards
    def _score(self, rollouts: Rollouts) -> torch.Tensor:
        scores = self.scorer.score(rollouts)
        return rewards_to_tensor(scores, self.reward_names, rollouts.num_generations)

    def _rollout(self, prompts: Sequence[Any], sampling: SamplingParams) -> Rollouts:
        with unwrap_model_for_generation(self.model, self.accelerator) as policy:
            was_training = policy.training
            policy.eval()
            try:
                return self.env.rollout(policy, prompts, self.config.num_generations, sampling)
            finally:
                policy.train(was_training)

    def generate_and_score(
        self, prompts: Sequence[Any], sampling: SamplingParams
    ) -> tuple[Rollouts, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rollouts and rewards ``[P, G, K]``, with flat groups resampled within budget.

        Returns also how often each prompt was resampled and which groups are still flat.
        """
        cfg, res = self.config, self.config.resample
        g = cfg.num_generations
        rollouts = self._rollout(prompts, sampling)
        rewards = self._score(rollouts)
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
            rewards[chosen] = self._score(fresh)
            rounds[chosen] += 1
            budget -= len(chosen) * g
        still_flat = is_flat() if res.enabled else torch.zeros(len(prompts), dtype=torch.bool)
        return rollouts, rewards, rounds, still_flat

    def _any_process(self, flag: bool) -> bool:
        if not self.synced_generation:
            return flag
        flags = self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device))
        return bool(flags.sum().item() > 0)

    # ------------------------------------------------------------------ the update
    def _micro_batches(self, n: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(n)
        yield from order.split(self.config.micro_batch_size)

    @torch.no_grad()
    def _reference_logps(self, input_ids: torch.Tensor, attention: torch.Tensor, width: int, temperature: float
                         ) -> torch.Tensor:
        pieces = []
        for index in torch.arange(len(input_ids)).split(self.config.micro_batch_size):
            if self.ref_model is not None:
                context, ref = contextlib.nullcontext(), self.ref_model
            else:
                context, ref = self.accelerator.unwrap_model(self.model).disable_adapter(), self.model
            with context:
                pieces.append(completion_logps(ref, input_ids[index], attention[index], width, temperature))
        return torch.cat(pieces)

    def optimise(self, rollouts: Rollouts, advantages: torch.Tensor, hp: StepHyperparams) -> dict[str, float]:
        cfg, device = self.config, self.accelerator.device
        input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1).to(device)
        attention = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1).to(device)
        mask = rollouts.completion_mask.to(device)
        old_logps = rollouts.old_logps.to(device)
        advantages = advantages.to(device)
        width = rollouts.completion_ids.shape[1]
        # The reference is scored at the policy's temperature so that k3 compares like with like (as TRL does).
        ref_logps = self._reference_logps(input_ids, attention, width, hp.temperature) if cfg.beta > 0 else None
        # Normalisers of the whole batch. DDP averages gradients over processes, so token_mean divides by the
        # global token count over the process count, exactly as TRL does.
        num_tokens = self.accelerator.gather(mask.sum().float()).sum().item() / self.accelerator.num_processes
        num_sequences = len(mask)

        totals = {"loss": 0.0, "clip/low_frac": 0.0, "clip/high_frac": 0.0, "kl": 0.0, "grad_norm": 0.0}
        self.model.train()
        for _ in range(cfg.num_iterations):
            for index in self._micro_batches(len(mask)):
                with self.accelerator.accumulate(self.model):
                    logps = completion_logps(self.model, input_ids[index], attention[index], width, hp.temperature)
                    terms = clipped_surrogate(
                        logps, old_logps[index], advantages[index], epsilon_low=hp.epsilon,
                        epsilon_high=hp.epsilon_high, beta=cfg.beta,
                        ref_logps=None if ref_logps is None else ref_logps[index])
                    loss = aggregate(terms.per_token_loss, mask[index], cfg.loss_type, num_tokens=num_tokens,
                                     num_sequences=num_sequences, max_completion_length=cfg.max_completion_length)
                    # accelerate divides by the accumulation count; our normaliser already covers the whole batch
                    self.accelerator.backward(loss * self.accumulation_steps)
                    if self.accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        if norm is not None:  # DeepSpeed clips inside its step and may not report a norm
                            totals["grad_norm"] += float(norm) / cfg.num_iterations
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                m = mask[index].float()
                tokens = max(num_tokens * self.accelerator.num_processes, 1.0)
                totals["loss"] += loss.item() / cfg.num_iterations
                totals["clip/low_frac"] += (terms.clipped_low * m).sum().item() / tokens / cfg.num_iterations
                totals["clip/high_frac"] += (terms.clipped_high * m).sum().item() / tokens / cfg.num_iterations
                if terms.kl is not None:
                    totals["kl"] += (terms.kl.detach() * m).sum().item() / tokens / cfg.num_iterations
            self.lr_scheduler.step()
        reduced = self.accelerator.reduce(torch.tensor(list(totals.values()), device=device), reduction="sum")
        summed = dict(zip(totals, reduced.tolist()))
        summed["loss"] /= self.accelerator.num_processes
        summed["grad_norm"] /= self.accelerator.num_processes
        return summed

    # ------------------------------------------------------------------ logging and saving
    def _reward_metrics(self, rewards: torch.Tensor, advantages: torch.Tensor, still_flat: torch.Tensor
                        ) -> dict[str, float]:
        fused = (rewards * torch.tensor(self.reward_weights, dtype=rewards.dtype)).sum(-1)
        flat_k = flat_reward_mask(rewards, self.config.std_tolerance)
        metrics = {
            "reward/mean": fused.mean().item(), "reward/std": fused.std().item() if fused.numel() > 1 else 0.0,
            "advantage/mean": advantages.mean().item(), "advantage/std": advantages.std().item()
            if advantages.numel() > 1 else 0.0,
            "advantage/min": advantages.min().item(), "advantage/max": advantages.max().item(),
            "resample/still_flat_frac": still_flat.float().mean().item(),
        }
        z = normalize_per_reward(rewards, std_tolerance=self.config.std_tolerance, eps=self.config.advantage_eps)
        for k, name in enumerate(self.reward_names):
            r = rewards[..., k]
            metrics[f"rewards/{name}/mean"] = r.mean().item()
            metrics[f"rewards/{name}/std"] = r.std().item() if r.numel() > 1 else 0.0
            metrics[f"rewards/{name}/normalized_abs_mean"] = z[..., k].abs().mean().item()
            metrics[f"rewards/{name}/flat_frac"] = flat_k[:, k].float().mean().item()
        return metrics

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.config.report_to == "wandb":
            self.accelerator.log({**metrics, **self._completion_table()}, step=step)
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def _completion_table(self) -> dict[str, Any]:
        """A few samples for wandb: a table of text, rewards and transcripts, and the audio with the same as
        captions, when the scorer can describe its samples; empty otherwise."""
        if not (self.config.log_completions and self.accelerator.is_main_process):
            return {}
        import wandb

        rows = self.scorer.sample_rows(self.last_rollouts, self.config.log_completions)
        if not rows:
            return {}
        columns = [k for k in rows[0] if k not in ("audio", "sample_rate")]
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        clips = [wandb.Audio(row["audio"], sample_rate=row["sample_rate"],
                             caption=" | ".join(f"{c}: {row.get(c)}" for c in columns)) for row in rows]
        return {"completions": table, "completions/audio": clips}

    def save(self) -> Path:
        state = {"lr_scheduler": self.lr_scheduler.state_dict(), "wandb_id": self.wandb_id}
        return save_checkpoint(self.accelerator, self.output_dir, self.step, state, self.config.save_total_limit)

    def save_model(self, path: str | Path) -> None:
        """The trained policy (or LoRA adapter) in Hugging Face format, safetensors."""
        self.accelerator.wait_for_everyone()
        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.save_pretrained(str(path), is_main_process=self.accelerator.is_main_process,
                                  save_function=self.accelerator.save,
                                  state_dict=self.accelerator.get_state_dict(self.model))
