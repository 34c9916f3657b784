"""One training loop for teachers and students."""
from certkd.runs import resolve_device
from certkd.training.loop import NonFiniteError, train
from certkd.training.step import Teacher, effective_alpha, training_loss

__all__ = ["NonFiniteError", "Teacher", "effective_alpha", "resolve_device", "train", "training_loss"]
