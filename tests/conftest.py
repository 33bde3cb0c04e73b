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
# On the CPU, the same tokens at other cells of the pool (or decoded beside other dialogues)
# give bit-identical logits. CUDA's kernels tile the cells in view and the batch by their
# number, so there the order of a sum, and the last bits, follow where a dialogue's cells sit.
LOGITS_ATOL = 0.0 if GPU_LAYERS == 0 else 1e-3


def assert_same_logits(actual, desired, atol: float = 0.0) -> None:
    """Equal as the CPU computes them (within `atol`), within LOGITS_ATOL on the GPU."""
    import numpy as np

    np.testing.assert_allclose(actual, desired, rtol=0, atol=max(atol, LOGITS_ATOL))


def whole_spans(cells, lo, hi, span):
    """Whether the cells between lo and hi fill whole spans, but one of which the latest cells."""
    by_span = {}
    for c in (int(c) for c in cells if lo <= c < hi):
        by_span.setdefault((c - lo) // span, []).append(c)
    partial = 0
    for k, kept in by_span.items():
        whole = list(range(lo + k * span, min(lo + (k + 1) * span, hi)))
        if kept != whole:
            if kept != whole[-len(kept):]:
                return False
            partial += 1
    return partial <= 1


def step_reply(llm, dlg, gen, between=None, until=None) -> int:
    """Run a reply's steps (Dialogue.send_steps' generator) as the server does: each token
    decoded by Context.decode_batch and its logits handed on at the next step. between(k) runs
    after the k-th decode, before its logits are handed on; if it returns True the generator is
    left open there (the token decoded, its logits not handed on). until=n leaves it open at
    step n + 1, not decoded. Returns the tokens decoded."""
    from loopserve_edge.dialogue import Step

    feed, k = None, 0
    while True:
        try:
            item = next(gen) if feed is None else gen.send(feed)
            while not isinstance(item, Step):
                item = next(gen)
        except StopIteration:
            return k
        if k == until:
            return k
        feed = llm.decode_batch([(dlg, item.token, item.pos)], scored=dlg.score_window > 0)[0]
        k += 1
        if between is not None and between(k):
            return k


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
