"""The base class of every error that tells a user what is wrong and what to do.

The command line prints such errors as one ``error: ...`` line (exit code 2) instead of a traceback;
any other exception is a bug and keeps its traceback.
"""


class UserFacingError(Exception):
    """Bad input or setup: the message names the file, id or setting and the fix."""
