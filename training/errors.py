"""Errors raised by the training engine."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row, a bad model/config combination)."""


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupted, or does not match the model being trained."""
