"""Errors of our own: the CLI turns each into one line on stderr and exit status 2."""


class EdgeInferError(Exception):
    """Base of every error edgeinfer reports to the user."""


class ModelNotFoundError(EdgeInferError):
    """The model path or catalog name does not exist."""


class ModelFormatError(EdgeInferError):
    """The file is not a model file, or its header or data is truncated or corrupt."""


class UnsupportedModelError(EdgeInferError):
    """The model is well-formed but uses an architecture or tensor type we do not run."""


class TokenizerError(EdgeInferError):
    """The tokenizer cannot be built or does not fit the model."""


class ChatTemplateError(EdgeInferError):
    """The chat template failed to compile or render."""


class ContextOverflowError(EdgeInferError):
    """The prompt does not fit in the context window."""


class FetchError(EdgeInferError):
    """Fetching or verifying a catalog model failed."""
