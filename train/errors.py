"""The exceptions of the training side, in one module that every layer may import.

Each message names the problem and the fix. The command line (train/cli.py) prints a
ConfigError, DataError or CheckpointMismatchError as one `error:` line with exit status 2;
a DivergedError (and StalledError) with exit status 1, the last good checkpoint kept. DataError
belongs to the data layer (data/errors.py), which never imports train/; it is named here too so
train code and the tools find every exception in one place.
"""
from data.errors import DataError  # noqa: F401  (one place for every exception)


class ConfigError(ValueError):
    """A config value that cannot work (reported to the user in one line)."""


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state this config builds."""


class DamagedCheckpointError(CheckpointMismatchError):
    """No checkpoint of the run folder can be read back intact."""


class DivergedError(RuntimeError):
    """A training step's loss or gradient norm was not finite (nan or inf)."""


class StalledError(DivergedError):
    """Steps in a row with nothing to learn from: every response cut, or every score equal."""
