"""Recover: train the factors after truncation (distillation from the dense model, SVD-LLM's sequential LoRA)."""

from svdzip.recover.config import HEAL_METHODS, HealConfig
from svdzip.recover.heal import HealReport, heal, heal_windows

__all__ = ["HEAL_METHODS", "HealConfig", "HealReport", "heal", "heal_windows"]
