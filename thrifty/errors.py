"""User-facing errors. Each message says what was wrong and what to do about it."""


class ThriftyError(Exception):
    """Base class of every error thrifty raises on purpose."""


class ModelLoadError(ThriftyError):
    """A model file or directory is missing, truncated or malformed."""


class UnsupportedModelError(ModelLoadError):
    """The model uses an architecture or tensor type thrifty cannot run."""


class InvalidRequestError(ThriftyError, ValueError):
    """A request or sampling parameter is out of range or inconsistent."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus the tokens to generate) does not fit the context window or KV pool."""
