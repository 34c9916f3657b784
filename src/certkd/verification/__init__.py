"""Evaluation and verification of trained models."""
from certkd.verification.empirical import SoundnessError, evaluate_accuracy

__all__ = ["SoundnessError", "evaluate_accuracy"]
