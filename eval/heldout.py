"""Held-out evaluation of a policy before and after GRPO: does training help on texts and voices it never saw?

A claim that RL helps needs three things this module measures together: the metric on held-out data (texts and
voices used neither in SFT nor in RL), the same metric for the starting checkpoint, and the spread between sampling
seeds, so that a gain can be told from noise. It also guards against the usual reward hack of TTS RL (saying less,
or stretching silence, to please the recogniser) by reporting the median audio duration per text character.

Utterances are synthesised by the run's own rollout environment (one sample per row, batched) and scored by the
run's own reward plugins, found by the roles they declare (:func:`~vocalign.rewards.base.plugin_roles`), not by their
names: ``error_rate`` is the per-utterance error rate of the plugin in the ``error_rate`` role (the ``cer`` plugin's
CER/WER, ``info["cer"]``), ``sim`` the similarity of the plugin in the ``similarity`` role (the ``sim`` plugin's
cosine, ``info["cosine"]``); every plugin's reward mean is reported too.

Every process scores its share of the rows and the per-row results are gathered, so that no process idles in a
collective while another evaluates. The figures do not depend on how many processes share the work: the rows are
cut into fixed batches of ``batch_size``, batch ``b`` goes to process ``b mod N``, and each batch is sampled from its
own seed (:func:`batch_seed`); the caller's random state is left as it was, so an evaluation during training does
not change the training run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from accelerate.utils import gather_object

from ..common.audio import write_audio
from ..common.generation import SamplingParams
from ..policies.sampling import RELEASED_SAMPLING
from ..rewards.base import RewardPlugin, RewardResult, Sample, plugin_roles, score_all
from ..rlhf.rollout import RolloutEnv
from .html import write_eval_page

if TYPE_CHECKING:
    from ..rlhf.trainer import GRPOTrainer

logger = logging.getLogger(__name__)


@dataclass
class HeldoutSettings:
    """The recipe's ``eval`` section."""

    # prompt rows (JSON lines / parquet, as for training), or `demo` for the demo's held-out set; required unless
    # the checkpoint is the demo's (then its held-out set), so that a real recipe never evaluates digits by default
    data: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # every row is sampled once per seed; tables show the mean and each
    limit: int | None = None  # evaluate the first `limit` rows only (quick checks)
    batch_size: int = 32  # rows sampled together; the batches are shared out between the processes
    every_steps: int = 0  # also score the policy being trained every N steps (eval/* in the metrics); 0: off
    save_wavs: int = 3  # utterances whose audio is written for each policy (first seed)
    # sampling as GLM-TTS synthesises, whatever the training schedule was
    temperature: float = RELEASED_SAMPLING.temperature
    top_k: int | None = RELEASED_SAMPLING.top_k  # null: no top-k cut
    top_p: float | None = RELEASED_SAMPLING.top_p  # null: no nucleus cut
    max_new_tokens: int = 256  # speech tokens per utterance at most (256 at 25 Hz: 10.2 s)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("eval.seeds must name at least one seed (two show the seed-to-seed spread)")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit must be >= 1 or null, got {self.limit}")
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps must be >= 0 (0: no evaluation during training), got "
                             f"{self.every_steps}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens)


@dataclass
class PolicyScores:
    """Per-utterance rows (one per row and seed) and per-seed means."""

    rows: list[dict[str, Any]]
    per_seed: dict[int, dict[str, float]]
    audio: list[tuple[np.ndarray, int]]  # the first rows' audio (first seed), for listening

    def summary(self) -> dict[str, Any]:
        """Means over seeds of every per-seed metric, with each seed's value and the spread (max - min)."""
        metrics = list(next(iter(self.per_seed.values())))
        out: dict[str, Any] = {}
        for key in metrics:
            values = [scores[key] for scores in self.per_seed.values()]
            out[key] = float(np.mean(values))
            out[f"{key}/per_seed"] = values
            out[f"{key}/seed_spread"] = float(max(values) - min(values))
        out["utterances"] = len(self.rows) // len(self.per_seed)
        return out


ROLE_COLUMNS = {"error_rate": "error_rate", "similarity": "sim"}  # each role's column (sim: as reports name it)
HELDOUT_COLUMNS = (*ROLE_COLUMNS.values(), "seconds_per_char_median")  # the table's columns, in order


def role_plugins(plugins: Sequence[RewardPlugin]) -> dict[str, tuple[str, str]]:
    """Role -> (plugin name, info key) of the plugins that declare one; two plugins in one role are an error, since
    a column cannot hold both."""
    out: dict[str, tuple[str, str]] = {}
    for plugin in plugins:
        for role, key in plugin_roles(plugin).items():
            if role in out:
                raise ValueError(f"rewards {out[role][0]!r} and {plugin.name!r} both declare the role {role!r}; the "
                                 f"held-out table has one {ROLE_COLUMNS[role]!r} column: set `roles` of one to {{}}")
            out[role] = (plugin.name, key)
    return out


def role_value(result: RewardResult, name: str, key: str, role: str, what: str) -> Any:
    """The measure reward ``name`` declares as its ``role`` (``info[key]``) for one utterance (``what``); a result
    without it is an error, so a table never shows a reward value in place of the measure."""
    if key not in result.info:
        raise ValueError(f"reward {name!r} declares info[{key!r}] as its {role}, but its result for {what} has none "
                         f"(status {result.status} {result.reason!r}, info keys {sorted(result.info)})")
    return result.info[key]


def _seed_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    means = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]
             if key in ROLE_COLUMNS.values() or key.startswith("reward/")}
    means["seconds_per_char_median"] = float(np.median([r["seconds"] / max(len(r["text"]), 1) for r in rows]))
    return means


class Processes(Protocol):
    """Where this process stands among those of the run (accelerate's ``PartialState`` or ``AcceleratorState``)."""

    process_index: int
    num_processes: int


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch`` under evaluation seed ``seed``: the evaluation seed itself for the first
    batch, a different one for each further batch. 32 bits, as torch's CPU generator keeps no more of a seed; the odd
    multiplier spreads the batches of one seed far from the other seeds' (an evaluation's seeds are small)."""
    return (seed + batch * 0x9E3779B9) % 2**32


@torch.no_grad()
def score_policy(env: RolloutEnv, model: torch.nn.Module, rows: Sequence[Mapping[str, Any]],
                 plugins: Sequence[RewardPlugin], settings: HeldoutSettings, processes: Processes | None = None,
                 synced: bool = False) -> PolicyScores:
    """Synthesise every row once per seed with ``model`` and score it; with ``processes``, each process samples
    its share of the batches and every process returns the whole result.

    ``synced``: sampling is a collective (DeepSpeed ZeRO-3 over several processes), so every process samples as
    many batches as the busiest one, and the sampler keeps step until all are done."""
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    batches = range(math.ceil(len(rows) / settings.batch_size))
    mine = batches[rank::world]
    turns = math.ceil(len(batches) / world) if synced else len(mine)
    sampling = replace(settings.sampling, synced_processes=synced)
    was_training = model.training
    model.eval()
    scored: list[dict[str, Any]] = []
    audio: list[tuple[int, np.ndarray, int]] = []
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for seed in settings.seeds:
                for turn in range(turns):
                    if turn >= len(mine):  # keep step with the processes that still sample; nothing to keep
                        env.rollout(model, rows[:settings.batch_size], 1, sampling)
                        continue
                    start = mine[turn] * settings.batch_size
                    torch.manual_seed(batch_seed(seed, mine[turn]))
                    extras = env.rollout(model, rows[start:start + settings.batch_size], 1, sampling).extras
                    scored.extend(_score_rows(extras, plugins, seed, start))
                    if seed == settings.seeds[0]:
                        audio.extend((start + i, e["audio"], e["sample_rate"]) for i, e in enumerate(extras)
                                     if start + i < settings.save_wavs)
    finally:
        model.train(was_training)
    if world > 1:
        scored, audio = gather_object(scored), gather_object(audio)
    seed_order = {seed: n for n, seed in enumerate(settings.seeds)}
    scored.sort(key=lambda row: (seed_order[row["seed"]], row["index"]))
    per_seed = {seed: _seed_means([r for r in scored if r["seed"] == seed]) for seed in settings.seeds}
    return PolicyScores(scored, per_seed, [(wav, rate) for _, wav, rate in sorted(audio, key=lambda a: a[0])])


def _score_rows(extras: Sequence[Mapping[str, Any]], plugins: Sequence[RewardPlugin], seed: int, start: int
                ) -> list[dict[str, Any]]:
    """One result row per synthesised utterance: its reward per plugin, the measure of each role (CER/WER with the
    transcript, SIM), duration."""
    results = score_all(plugins, [Sample.from_mapping(e) for e in extras])
    roles = role_plugins(plugins)
    rows = []
    for i, extra in enumerate(extras):
        row: dict[str, Any] = {"seed": seed, "index": start + i, "text": extra["text"],
                               "seconds": len(extra["audio"]) / extra["sample_rate"]}
        for name, scored in results.items():
            row[f"reward/{name}"] = scored[i].value
        for role, (name, key) in roles.items():
            row[ROLE_COLUMNS[role]] = role_value(results[name][i], name, key, role, f"utterance {start + i}")
            if role == "error_rate":
                row["transcript"] = results[name][i].info.get("transcript", "")
        rows.append(row)
    return rows


class HeldoutEvaluation:
    """What a recipe's ``eval`` section builds: the run's environment and reward plugins, the held-out rows, and
    where the starting policy's weights are (to rebuild the trained one from ``final/``)."""

    def __init__(self, env: RolloutEnv, plugins: Sequence[RewardPlugin], rows: Sequence[Mapping[str, Any]],
                 settings: HeldoutSettings, base_model_dir: str | Path) -> None:
        if not rows:
            raise ValueError("the held-out evaluation set is empty")
        role_plugins(plugins)  # two plugins in one role fail here, not after the training run
        self.env, self.plugins, self.rows, self.settings = env, list(plugins), list(rows)[:settings.limit], settings
        self.base_model_dir = Path(base_model_dir)

    def score(self, model: torch.nn.Module, processes: Processes | None = None, synced: bool = False
              ) -> PolicyScores:
        """Every process calls it (with ``processes``) and gets the same scores; see :func:`score_policy`."""
        return score_policy(self.env, model, self.rows, self.plugins, self.settings, processes, synced)

    def during_training(self, trainer: GRPOTrainer, steps_done: int) -> dict[str, float] | None:
        """A trainer step callback: every ``eval.every_steps`` steps, the policy being trained scored on the
        held-out rows, as ``eval/<metric>`` (mean over seeds) and ``eval/<metric>/seed_spread`` figures."""
        every = self.settings.every_steps
        if not every or steps_done % every:
            return None
        cfg = trainer.config
        if (steps_done - 1) % cfg.logging_steps and steps_done != cfg.max_steps:
            logger.warning("the held-out figures after step %d are not written: with trainer.logging_steps=%d that "
                           "step's metrics are not logged; set trainer.logging_steps=1 to log every evaluation",
                           steps_done, cfg.logging_steps)
        from trl.models.utils import unwrap_model_for_generation

        t0 = time.perf_counter()
        with unwrap_model_for_generation(trainer.model, trainer.accelerator) as policy:
            summary = self.score(policy, trainer.accelerator.state, trainer.setup.synced_generation).summary()
        figures = {f"eval/{key}": value for key, value in summary.items() if isinstance(value, float)}
        return {**figures, "time/eval_s": time.perf_counter() - t0}

    def trained_policy(self, final_dir: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The policy the trainer saved in ``final_dir``: full weights, or a LoRA adapter over the base model
        (merged). Loading from disk works whatever sharding the training used."""
        from transformers import LlamaForCausalLM

        final_dir = Path(final_dir)
        if (final_dir / "adapter_config.json").is_file():
            from peft import PeftModel

            base = LlamaForCausalLM.from_pretrained(str(self.base_model_dir))
            model = PeftModel.from_pretrained(base, str(final_dir)).merge_and_unload()
        else:
            model = LlamaForCausalLM.from_pretrained(str(final_dir))
        return model.to(device).eval()


def compare(results: Mapping[str, PolicyScores], out_dir: str | Path, before: str = "sft", after: str = "grpo"
            ) -> dict[str, Any]:
    """``eval.json`` (each policy's summary, and the relative change of each metric), ``eval.md`` (the table),
    ``eval_utterances.jsonl``, ``eval_wavs/<policy>/<n>.wav`` and ``eval.html`` (the table, the curves and the
    saved utterances on one page); returns what ``eval.json`` holds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {name: scores.summary() for name, scores in results.items()}
    if before in report and after in report:
        a, b = report[before], report[after]
        report["relative_change"] = {k: (b[k] - a[k]) / a[k] for k in ("error_rate", "seconds_per_char_median")
                                     if k in a and k in b and a[k]}
        if "sim" in a and "sim" in b:
            report["sim_change"] = b["sim"] - a["sim"]
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out_dir / "eval_utterances.jsonl").open("w") as f:
        for name, scores in results.items():
            for row in scores.rows:
                f.write(json.dumps({"policy": name, **row}) + "\n")
    for name, scores in results.items():
        folder = out_dir / "eval_wavs" / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, (audio, rate) in enumerate(scores.audio):
            write_audio(folder / f"{n}.wav", audio, rate)
    table = format_table(report, list(results))
    (out_dir / "eval.md").write_text(table + "\n")
    write_eval_page(out_dir)  # the table, the run's curves and the saved utterances, to listen to
    logger.info("held-out evaluation (%s):\n%s", out_dir / "eval.json", table)
    return report


def policy_summaries(report: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The policies' summaries in what :func:`compare` wrote to ``eval.json``, by policy name, in order, whatever
    the policies are called: the entries that count their ``utterances`` (see :meth:`PolicyScores.summary`)."""
    return {name: entry for name, entry in report.items() if isinstance(entry, Mapping) and "utterances" in entry}


def seed_cell(mean: float, per_seed: Sequence[float]) -> str:
    """``mean [seed 0, seed 1, ...]``: a figure beside the spread it should be read against."""
    return f"{mean:.4f} [" + ", ".join(f"{v:.4f}" for v in per_seed) + "]"


def format_table(report: Mapping[str, Any], policies: Sequence[str]) -> str:
    """Markdown: one row per policy, each metric as its mean over seeds and, in brackets, each seed's value."""
    metrics = [k for k in HELDOUT_COLUMNS if all(k in report[p] for p in policies)]
    lines = ["| policy | " + " | ".join(f"{m} (mean [per seed])" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for p in policies:
        cells = [seed_cell(report[p][m], report[p][m + "/per_seed"]) for m in metrics]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
