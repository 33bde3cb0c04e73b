"""The multi-turn benchmark: task generators, scorers, fidelity, methods, and the harness
end to end (the default model on CPU, through the CLI)."""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import loopserve_edge  # noqa: F401  (before numpy: see conftest.py)
import numpy as np
import pytest

from loopserve_edge.bench import fidelity, scoring
from loopserve_edge.bench.dialogues import ACK, Block, Question, Tokens, layout
from loopserve_edge.bench.methods import METHODS, Run, expand
from loopserve_edge.bench.tasks import FAMILIES, TASKS, generate

CLI = [sys.executable, "-m", "loopserve_edge.cli", "bench"]


@pytest.fixture(scope="module")
def tokens(default_model):
    from loopserve_edge import Llama, LoopServeConfig

    llm = Llama(default_model, n_ctx=256, n_threads=2, loopserve=LoopServeConfig(max_resident=1))
    yield Tokens(llm)
    llm.close()


def text_before(case, turn_index):
    """Everything the user has said up to and including a turn."""
    return "\n\n".join(t.user for t in case.turns[:turn_index + 1])


# -- generators ---------------------------------------------------------------------------

def resolve_var(text, name):
    assigns = dict(re.findall(r"VAR (\w+) = ((?:VAR )?\w+)\.", text))
    value = assigns[name]
    while value.startswith("VAR "):
        value = assigns[value[4:]]
    return value


def check_answer_in_context(case, i, turn):
    """The reference answer of a scored turn really follows from what was said."""
    seen = text_before(case, i)
    task = case.task
    if task == "open_generation":
        k = re.search(r"Document \[(\d+)\]", turn.user).group(1)
        assert f"Document [{k}] (Title:" in seen
        return
    (answer,) = turn.answers[:1]
    if task == "aggregation":
        log = re.findall(r"Entry \d+: a visitor brought a (\w+)\.", seen)
        counts = Counter(log)
        if turn.scorer == "choice":
            (top, n), (_, n2) = counts.most_common(2)
            assert answer == top and n > n2 and set(turn.choices) >= set(counts)
        else:
            item = re.search(r"brought a (\w+)\?", turn.user).group(1)
            assert int(answer) == counts[item]
    elif task == "variable_tracking":
        name = re.search(r"value of VAR (\w+)\?", turn.user).group(1)
        assert resolve_var(seen, name) == answer
    elif task == "state_tracking":
        attr = re.search(r"What is my (.+?) now\?", turn.user).group(1)
        values = re.findall(rf"my {attr} is (?:now )?(\d+)\.", seen)
        assert values and values[-1] == answer
    elif task == "chained":
        if i == next(k for k, t in enumerate(case.turns) if t.scorer):
            subject = re.search(r"does agent (\w+) report", turn.user).group(1)
        else:
            subject = case.turns[i - 1].answers[0]
        assert f"Agent {subject} reports to agent {answer}." in seen
        assert answer in turn.choices and subject not in turn.choices
    elif task == "kv_retrieval":
        key = re.search(r'key "([0-9a-f-]+)"', turn.user).group(1)
        assert f'"{key}": "{answer}"' in seen
    elif task == "passkey":
        assert f"The pass key is {answer}." in seen
    elif task == "multi_needle":
        city = re.search(r"number for (\w+)\?", turn.user).group(1)
        assert f"The special magic number for {city} is {answer}." in seen
    else:  # NQ question answering: the gold passage is in the context
        assert any(a in seen for a in turn.answers), (turn.user[-200:], turn.answers)


@pytest.mark.parametrize("task", TASKS)
def test_generator_answers_are_in_the_context_and_fit_the_length(task, tokens):
    for ctx, turns in ((1024, 2), (4096, 3)):
        case = generate(task, ctx=ctx, turns=turns, seed=0, index=0, tokens=tokens)
        scored = [(i, t) for i, t in enumerate(case.turns) if t.scorer]
        assert len(scored) == turns
        for i, t in scored:
            check_answer_in_context(case, i, t)
        n = tokens.dialogue(case.system, case.turns)
        assert 0.9 * ctx <= n <= ctx, (task, ctx, n)
        assert case.meta["tokens"] == n


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_per_seed(task, tokens):
    a = generate(task, ctx=1024, turns=2, seed=3, index=1, tokens=tokens)
    b = generate(task, ctx=1024, turns=2, seed=3, index=1, tokens=tokens)
    c = generate(task, ctx=1024, turns=2, seed=4, index=1, tokens=tokens)
    assert a == b and a.digest() == b.digest()
    assert c.digest() != a.digest()


@pytest.mark.parametrize("task", ["passkey", "kv_retrieval", "chained", "docs_over_turns"])
def test_question_positions(task, tokens):
    cases = {p: generate(task, ctx=1024, turns=2, seed=0, index=0, tokens=tokens, position=p)
             for p in ("before", "after", "later")}
    before, after, later = cases["before"].turns, cases["after"].turns, cases["later"].turns
    first = next(t for t in after if t.scorer)
    question = first.user.rsplit("\n\n", 1)[1]
    assert len(first.user) > 4 * len(question)              # material, then the question
    first_b = next(t for t in before if t.scorer)
    assert first_b.user.startswith(question)                # the question, then the material
    assert later[0].scorer is None and later[0].user.endswith(ACK)
    asked = next(t for t in later if t.scorer)
    assert asked.user == question                          # on its own, in a later turn
    assert len(later) > len(after)


def test_families_refuse_positions_they_do_not_have(tokens):
    assert FAMILIES["nq_qa_first"].positions == ("before",)
    with pytest.raises(ValueError, match="no 'before' variant"):
        generate("state_tracking", ctx=1024, turns=2, seed=0, index=0, tokens=tokens, position="before")


def test_layout_without_a_model():
    q = Question("Q?", ("a",), "contains")
    blocks = [Block("M1", None), Block("M2", q), Block("", q)]
    assert [t.user for t in layout(blocks, "after")] == [f"M1\n\n{ACK}", "M2\n\nQ?", "Q?"]
    assert [t.user for t in layout(blocks, "before")] == [f"M1\n\n{ACK}", "Q?\n\nM2", "Q?"]
    assert [t.user for t in layout(blocks, "later")] == [f"M1\n\n{ACK}", f"M2\n\n{ACK}", "Q?", "Q?"]
    assert [t.scorer for t in layout(blocks, "later")] == [None, None, "contains", "contains"]
