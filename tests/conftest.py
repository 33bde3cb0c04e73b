import os
import sys
from pathlib import Path

# llama.cpp's library must load before numpy: on the GPU box's Python the other order
# crashes the first model load (the tokenizer's std::regex, a libstdc++ clash).
import loopserve_edge  # noqa: F401,E402  (first import on purpose)

import pytest

sys.path.insert(0, str(Path(__file__).parent))

THREADS = min(2, os.cpu_count() or 1)
# The GPU box runs the same tests with every layer offloaded (benchmarks/device_run.sh).
GPU_LAYERS = int(os.environ.get("LOOPSERVE_TEST_GPU_LAYERS", "0"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> Path:
    """Same shape and tokenizer as tiny_model, other weights."""
    from tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-other.gguf", seed=1)


@pytest.fixture(scope="session")
def default_model() -> Path:
    from loopserve_edge.paths import default_model as find

    return find()  # raises with instructions if setup did not install it


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Named dialogues go to a per-test directory, never the user's."""
    home = tmp_path / "home"
    monkeypatch.setenv("LOOPSERVE_EDGE_HOME", str(home))
    return home


@pytest.fixture
def make_llm():
    from loopserve_edge import Llama

    made = []

    def make(model, **kw):
        kw.setdefault("n_ctx", 512)
        kw.setdefault("n_threads", THREADS)
        kw.setdefault("n_gpu_layers", GPU_LAYERS)
        llm = Llama(model, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()
