"""User-facing errors: a message that names the problem and the fix, shown as one line by the CLI."""


class EDMToolkitError(ValueError):
    """Bad input from a user (option, preset, file); the message says what is wrong and how to fix it."""


class ConfigError(EDMToolkitError):
    """An invalid component, preset or option value."""


class CheckpointError(EDMToolkitError):
    """A model file that cannot be read safely or is not of a supported format."""


class CheckpointWarning(UserWarning):
    """Something about a model file that a user must know but that is no error (e.g. embedded code that is not
    the official one, or training weights used because the file has no EMA weights); the CLI prints it as one
    ``Warning: ...`` line."""
