"""Errors every command shares; a leaf module, so any part of the tree may import it."""


class UsageError(Exception):
    """A user mistake that deserves one clear line, not a traceback."""
