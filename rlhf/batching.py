"""How a batch of completions is cut into micro-batches for the update.

TTS completions vary 2-20x in length within a batch. Padding every micro-batch to the batch's widest completion
spends most of the update's compute on padding; sorting by length and trimming each micro-batch to its own widest
row (and its prompts to their own widest) gives the same gradient: every row's tokens see the same context, and
the loss normaliser is the whole batch's (``loss.aggregate``), whatever the micro-batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    rows: torch.Tensor  # [B] indices into the batch
    prompt_start: int  # first prompt column any of the rows uses (prompts are left-padded)
    width: int  # completion columns kept: the widest row's length (at least 1)


def plan_micro_batches(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, size: int,
                       group_by_length: bool) -> list[MicroBatch]:
    """Micro-batches of ``size`` rows: longest completions first when ``group_by_length`` (each trimmed to its own
    width), else in batch order at the batch's full width."""
    lengths = completion_mask.sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True) if group_by_length else torch.arange(len(lengths))
    plan = []
    for rows in order.split(size):
        if group_by_length:
            used = prompt_mask[rows].sum(0).nonzero()
            prompt_start = int(used[0]) if len(used) else prompt_mask.shape[1]
            width = max(int(lengths[rows].max()), 1)
        else:
            prompt_start, width = 0, completion_mask.shape[1]
        plan.append(MicroBatch(rows, prompt_start, width))
    return plan
