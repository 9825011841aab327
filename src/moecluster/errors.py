"""The one exception type for errors a user can cause (bad input, missing files, dead ranks)."""


class MoeClusterError(Exception):
    """An error whose message says what went wrong and what to do; the CLI prints it on one line."""
