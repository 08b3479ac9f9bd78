"""Errors a user can cause: each carries one line saying what to change."""


class SlimtuneError(Exception):
    """Base class for user-facing errors; the CLI prints the message without a traceback."""


class ConfigError(SlimtuneError):
    """A flag, recipe or argument is wrong."""


class ModelNotFoundError(ConfigError):
    """An unknown model name was requested."""


class CheckpointError(SlimtuneError):
    """A checkpoint file is missing, corrupt or incompatible."""


class DataError(SlimtuneError):
    """A dataset, image or label file is missing or malformed."""


class RestoreError(CheckpointError):
    """A restore plan has problems nobody asked to ignore."""


class TrainingDiverged(SlimtuneError):
    """The loss became NaN or infinite."""


class DiskFullError(SlimtuneError):
    """A write ran out of space (or hit the file-size limit); the partial file was removed."""
