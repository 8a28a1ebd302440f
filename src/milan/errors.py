"""What can go wrong because of what the user gave us, and only that.

Every `UserError` message names the problem and its fix (`data.path=/x: no images found; ...`).
The `milan` command prints a `UserError` as one line and exits with status 2
(`MILAN_TRACEBACK=1` shows the traceback); any other exception is a bug or an environment
failure and keeps its traceback. Nothing below the command line raises `SystemExit`.

Each class also derives from the builtin exception a Python caller would expect (a bad value is
a `ValueError`, a missing file a `FileNotFoundError`), so `except ValueError` keeps working.
"""

from __future__ import annotations

__all__ = [
    "UserError",
    "ConfigError",
    "DataError",
    "WeightsError",
    "CheckpointError",
    "TeacherError",
    "TrainingError",
    "DataNotFound",
    "TeacherFileNotFound",
]


class UserError(Exception):
    """A problem with the user's input (config, data, files); the message names the fix."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message says which and what is allowed."""


class DataError(UserError, ValueError):
    """A dataset cannot be used as given: a missing folder, no images, too many unreadable files."""


class WeightsError(UserError, ValueError):
    """A weights file cannot be read, or does not fit the model it is loaded into."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written, read or resumed from."""


class TeacherError(UserError, ValueError):
    """A teacher spec or its weights cannot be used."""


class DataNotFound(DataError, FileNotFoundError):
    """A data path, file or folder is not there, or holds no images."""


class TeacherFileNotFound(TeacherError, FileNotFoundError):
    """A teacher's weights file or folder is not there."""


class TrainingError(UserError, RuntimeError):
    """A run cannot go on (e.g. the loss became NaN); the message says what to change and how to resume."""
