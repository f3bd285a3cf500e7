"""One exception type per kind of user error; the CLI prints the message and exits non-zero."""


class SpinlmError(Exception):
    """Base class: an error the user can fix, reported as one line without a traceback."""


class ConfigError(SpinlmError):
    """A config key is unknown, has the wrong type or an impossible value."""


class DataError(SpinlmError):
    """A data file or record is unusable; the message names the file and line."""


class CheckpointError(SpinlmError):
    """A checkpoint is missing, partial or corrupt."""


class TrainingError(SpinlmError):
    """Training cannot go on (a non-finite loss, out of memory); nothing bad was saved."""
