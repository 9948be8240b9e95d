"""The model package's errors, in a module that imports nothing: the run layer
(:mod:`cliplung.runs`) raises them without loading a model."""

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model its config describes."""
