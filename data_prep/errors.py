"""The one exception type for user mistakes, so the CLI can print it as a single line."""


class PrepError(ValueError):
    """A user error (bad path, wrong option, unusable input); the message names the fix."""
