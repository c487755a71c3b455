"""Supervised fine-tuning of the speech LM: the step and batches the demo's SFT shares, and the LoRA voice recipe
(``vocalign sft configs/lora_voice.yaml``). Not reinforcement learning, so not in ``rlhf``."""
