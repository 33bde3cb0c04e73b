"""Replies held to a form: GBNF grammars, OpenAI's response_format (JSON, JSON schemas), through
llama.cpp's grammar sampler; the sampler's choice among the tokens a grammar allows."""
import collections
import json
import re

import numpy as np
import pytest

from loopserve_edge import LoopServeError, grammar
from loopserve_edge.openai_api import RequestError
from loopserve_edge.sampling import Sampler, SamplingParams

# a finite language: the reply must be one of these, then end
CHOICES = 'root ::= ("yes" | "no") " " ("sir" | "madam")'
ANSWERS = {"yes sir", "yes madam", "no sir", "no madam"}


class Allow:
    """A stand-in constraint: these tokens only (what grammar.Constraint answers for a grammar)."""

    def __init__(self, allowed):
        self.allowed, self.accepted, self.masks = set(allowed), [], 0

    def allows(self, tok):
        return tok in self.allowed

    def mask(self, logits):
        self.masks += 1
        out = np.full(len(logits), -np.inf)
        idx = sorted(self.allowed)
        out[idx] = np.asarray(logits, dtype=np.float64)[idx]
        return out

    def accept(self, tok):
        assert tok in self.allowed
        self.accepted.append(tok)


def test_greedy_takes_the_best_allowed_token_and_asks_for_the_mask_only_when_refused():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    c = Allow({1, 3})
    assert Sampler(SamplingParams(temperature=0), c)(logits) == 1 and c.masks == 1
    c = Allow({0, 3})
    assert Sampler(SamplingParams(temperature=0), c)(logits) == 0 and c.masks == 0   # the first choice stood
    assert c.accepted == [0]


def test_sampling_gives_each_allowed_token_its_masked_probability():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    c = Allow({1, 2, 3})
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7), c)
    n = 30000
    counts = collections.Counter(s(logits) for _ in range(n))
    assert set(counts) == {1, 2, 3}
    # 0.3, 0.2, 0.1 renormalised: 1/2, 1/3, 1/6; a first draw kept where allowed, else redrawn
    for tok, p in {1: 1 / 2, 2: 1 / 3, 3: 1 / 6}.items():
        assert abs(counts[tok] / n - p) < 0.015
    assert 0.3 < c.masks / n < 0.5   # the mask only after the 40% of first draws refused


def test_response_formats_become_grammars_and_bad_ones_are_refused():
    assert grammar.for_response_format(None) is None
    assert grammar.for_response_format({"type": "text"}) is None
    assert grammar.for_response_format({"type": "json_object"}) == grammar.json_grammar()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    g = grammar.from_schema(schema)
    assert grammar.for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == g
    assert grammar.for_response_format({"type": "json_object", "schema": schema}) == g   # llama-cpp-python's
    assert "root ::=" in g
    for bad, what in [({"type": "xml"}, "not supported"), ("json", "not supported"), ({"type": "json_schema"}, "needs"),
                      ({"type": "json_schema", "json_schema": {"schema": 3}}, "needs"),
                      ({"type": "json_object", "schema": [1]}, "must be an object")]:
        with pytest.raises(grammar.GrammarError, match=what):
            grammar.for_response_format(bad)


def test_a_reply_follows_the_grammar_and_ends_where_it_is_complete(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    free = llm.dialogue().send("hello there", temperature=0, max_tokens=16)
    assert free not in ANSWERS   # the random model would not say any of them of itself
    for seed in range(6):
        d = llm.dialogue()
        reply = d.send("hello there", temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_tokens=32,
                       grammar=CHOICES)
        assert reply in ANSWERS and d.last_stats.finish_reason == "stop"
        # the next turn is free again, in the same dialogue
        d.send("and?", temperature=0, max_tokens=4)
        assert d.messages[1]["content"] == reply and len(d.messages) == 4


def test_json_from_a_schema_parses_and_has_its_fields_on_the_default_model(default_model, make_llm):
    llm = make_llm(default_model, n_ctx=1024)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"]}
    d = llm.dialogue()
    reply = d.send("What is 2+2? Answer in JSON.", temperature=0, max_tokens=64, grammar=grammar.from_schema(schema))
    assert d.last_stats.finish_reason == "stop"
    obj = json.loads(reply)
    assert set(obj) == {"answer", "sure"} and isinstance(obj["sure"], bool)
    # any JSON object, streamed
    d = llm.dialogue()
    pieces = list(d.send("Give me a JSON object describing a cat with its name and age.", stream=True,
                         temperature=0, max_tokens=96,
                         grammar=grammar.json_grammar()))
    assert len(pieces) > 1 and d.last_stats.finish_reason == "stop"
    assert isinstance(json.loads("".join(pieces)), dict)


def test_a_grammar_that_does_not_parse_or_cannot_hold_the_reply_changes_nothing(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    d = llm.dialogue()
    d.send("hi", temperature=0, max_tokens=4)
    before = (list(d.tokens), list(d.messages), d.turns)
    for bad in ["root ::= undefined-rule", "not gbnf at all", ""]:
        with pytest.raises(grammar.GrammarError, match="grammar"):
            d.send("next", grammar=bad)
        assert (d.tokens, d.messages, d.turns) == before
    with pytest.raises(LoopServeError, match="start of the reply"):
        d.send("next", grammar=CHOICES, reply_prefix="yes")
    assert (d.tokens, d.messages, d.turns) == before


def test_the_python_calls_take_response_format_and_llama_cpp_python_grammars(tiny_model, make_llm):
    from llama_cpp import LlamaGrammar

    llm = make_llm(tiny_model)
    m = [{"role": "user", "content": "hi"}]
    r = llm.create_chat_completion(m, grammar=LlamaGrammar.from_string(CHOICES), max_tokens=16, seed=1)
    assert r["choices"][0]["message"]["content"] in ANSWERS and r["choices"][0]["finish_reason"] == "stop"
    r = llm("Say:", grammar=CHOICES, max_tokens=16, seed=2)
    assert r["choices"][0]["text"] in ANSWERS
    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 3}}, "required": ["k"]}
    chunks = llm.create_chat_completion(m, stream=True, max_tokens=48, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "k", "schema": schema}})
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert re.fullmatch(r'\{ ?"k" ?: ?"[^"]{0,3}" ?\} ?', text), text
    for kw, param in [(dict(response_format={"type": "xml"}), "response_format"), (dict(grammar=5), "grammar"),
                      (dict(response_format={"type": "json_object"}, grammar=CHOICES), "grammar")]:
        with pytest.raises(RequestError) as e:
            llm.create_chat_completion(m, **kw)
        assert e.value.param == param
    with pytest.raises(RequestError) as e:
        llm.create_chat_completion(m + [{"role": "assistant", "content": "ye"}], grammar=CHOICES)
    assert e.value.param == "messages"
