"""The one exception the data layer raises for problems in the user's input.

Every message names the problem and the fix; the command line catches DataError, prints the
message without a traceback and exits with status 2.
"""


class DataError(ValueError):
    """A problem with the user's data or data settings, with a message saying how to fix it."""
