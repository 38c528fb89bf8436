"""Recover: train the factors after truncation (distillation from the dense model, SVD-LLM's sequential LoRA).

`config` (the options, cheap to import: the CLI reads its defaults) · `heal` (the training) · `directory`
(heal a saved directory) · `losses`, `trainer`, `seq_lora` (the pieces).
"""
