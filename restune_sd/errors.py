"""The one exception type that user-facing code raises for bad input; the CLI prints it as a single line."""


class UserError(ValueError):
    """Bad input from a user: the message says what is wrong and what to do. The CLI exits 2 with it."""
