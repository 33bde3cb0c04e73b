"""Errors a user can act on; each message names what is wrong and what to do."""


class LoopServeError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class RuntimeBuildError(LoopServeError, ImportError):
    """The llama-cpp-python that is installed is not the patched loopserve-edge runtime."""


class ModelFileError(LoopServeError):
    """A model path that is missing, unreadable or not a GGUF model."""


class StateFileError(LoopServeError):
    """A dialogue state file that cannot be loaded; the live context was not touched."""


class ContextFullError(LoopServeError):
    """A turn that does not fit in the context; the dialogue is left as it was."""


class ChatTemplateError(LoopServeError):
    """Messages that the model's chat template refuses to render (its own check, such as roles
    that must alternate from the user's); nothing was computed."""


class DialogueNotFoundError(LoopServeError):
    """A dialogue name with no state file."""
