"""loopserve-edge: long multi-turn chat with quantized GGUF models (LoopServe on llama.cpp)."""
from .errors import (ChatTemplateError, ContextFullError, DialogueNotFoundError, LoopServeError,
                     ModelFileError, RuntimeBuildError, StateFileError)
from .config import LoopServeConfig
from .bindings import runtime_info
from .dialogue import Dialogue, TurnStats
from .llama import Llama

__version__ = "0.1.0"

__all__ = ["Llama", "LoopServeConfig", "Dialogue", "TurnStats", "runtime_info", "LoopServeError",
           "ModelFileError", "StateFileError", "ContextFullError", "DialogueNotFoundError",
           "RuntimeBuildError", "ChatTemplateError"]
