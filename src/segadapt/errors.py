"""Errors a user can cause. Each message names the file or key at fault and the fix."""


class SegadaptError(Exception):
    """Base class of every error segadapt raises on purpose."""


class ConfigError(SegadaptError, ValueError):
    """A config file or command-line override is invalid."""


class DataError(SegadaptError, ValueError):
    """A dataset file is missing, unreadable or inconsistent."""


class CheckpointError(SegadaptError, ValueError):
    """A checkpoint or weight file cannot be loaded into a model."""
