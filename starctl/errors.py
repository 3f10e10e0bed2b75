"""User-facing errors.

A `StarctlError` is a mistake in what the user asked for (a bad name, a missing file, a bad
argument). The CLI prints its message on one line and exits with code 2; everything else is a
bug and keeps its traceback.
"""


class StarctlError(Exception):
    """An input problem the user can fix; the message names it."""
