"""One process of a two-process GRPO run under DeepSpeed ZeRO-3 on CPU, started by `accelerate launch` from
tests/test_synced_sampling.py. Writes, per rollout, whether sampling was synced, how many forward passes the
policy made and how long the longest completion was, to OUT/rank<N>.json.

The Accelerator is made here, not by the trainer, only because CPU processes under DeepSpeed need the gloo backend.
"""

import json
import sys
from dataclasses import replace

from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from vocalign.rlhf.config import GRPOConfig
from vocalign.rlhf.toy_env import ToyConfig, ToyEnv, ToyScorer, build_toy_model, toy_prompts
from vocalign.rlhf.trainer import GRPOTrainer


class RecordingEnv(ToyEnv):
    """The toy environment with this process's own length bound (as GLM-TTS bounds speech by the text's length, so
    processes holding different texts finish at different steps), recording what each rollout was asked and cost."""

    def __init__(self, cfg, max_new_tokens):
        super().__init__(cfg)
        self.max_new_tokens, self.records = max_new_tokens, []

    def rollout(self, model, prompts, num_generations, sampling):
        calls = []
        hook = model.register_forward_hook(lambda *_: calls.append(1))
        try:
            out = super().rollout(model, prompts, num_generations, replace(sampling, max_new_tokens=self.max_new_tokens))
        finally:
            hook.remove()
        self.records.append({"synced": sampling.synced_processes, "forwards": len(calls),
                             "longest": int(out.completion_mask.sum(-1).max())})
        return out


def main(out_dir: str) -> None:
    toy = ToyConfig()
    config = GRPOConfig(output_dir=out_dir, max_steps=3, prompts_per_step=2, num_generations=4, micro_batch_size=8,
                        max_completion_length=12, learning_rate=1e-3, report_to="none", save_steps=1000)
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
                              deepspeed_plugin=DeepSpeedPlugin(hf_ds_config="launch/zero3.json"))
    env = RecordingEnv(toy, max_new_tokens=3 if accelerator.process_index == 0 else 12)
    GRPOTrainer(build_toy_model(toy), env, ToyScorer(toy), toy_prompts(toy), config, accelerator=accelerator).train()
    with open(f"{out_dir}/rank{accelerator.process_index}.json", "w") as f:
        json.dump({"processes": accelerator.num_processes, "rollouts": env.records}, f)


if __name__ == "__main__":
    main(sys.argv[1])
