"""The one exception type for bad input: its message is the one line a user sees."""


class SkuvisionError(RuntimeError):
    """A problem with the user's config, files or environment, with a message that says how to fix it."""
