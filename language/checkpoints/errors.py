"""The one error a checkpoint reader raises."""


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded as asked: the message names the file, tensor and shapes."""
