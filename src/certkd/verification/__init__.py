"""Evaluation and verification of trained models."""
from certkd.verification.accuracy import SoundnessError, evaluate_accuracy

__all__ = ["SoundnessError", "evaluate_accuracy"]
