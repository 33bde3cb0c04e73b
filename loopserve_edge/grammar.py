"""Replies held to a form: OpenAI's `response_format` (a JSON object, or one a JSON schema
describes) and llama.cpp's GBNF grammars, enforced token by token by llama.cpp's own grammar
sampler in the runtime.

The sampler (sampling.py) first chooses as if there were no grammar and asks the grammar about
that one token; only when it is refused are all the vocabulary's tokens checked and the choice
made again among those allowed (as llama.cpp's common sampler does). Drawing again from the
allowed tokens after a refusal gives each allowed token the probability it has once the refused
ones are masked out (exactly so where no top-k, top-p or min-p cut applies; with one, the first
draw's cut is of the unmasked distribution), and checking one token costs a fraction of checking
the vocabulary."""
from __future__ import annotations

import ctypes
import json

import numpy as np

from .bindings import llama_c
from .errors import LoopServeError

from llama_cpp import llama_grammar  # isort: skip  (after bindings, which checks the runtime)

# llama_token_data, as numpy lays out a vocabulary of them (one array, no per-token objects)
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_c.llama_token_data)


class GrammarError(LoopServeError, ValueError):
    """A grammar, JSON schema or response_format that cannot be used (found before the prompt is
    prefilled, but for a grammar that no token can continue, found where the reply gets there)."""


def for_response_format(fmt) -> str | None:
    """The GBNF grammar OpenAI's `response_format` asks for; None for plain text.
    {"type": "json_object"} is any JSON object (with llama-cpp-python's "schema" beside it: one
    that schema describes); {"type": "json_schema", "json_schema": {"schema": {...}}} one the
    schema describes."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar() if fmt.get("schema") is None else from_schema(fmt["schema"])
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError('response_format "json_schema" needs {"json_schema": {"name": ..., "schema": {...}}}')
        return from_schema(spec.get("schema", {}))
    raise GrammarError(f"response_format type {json.dumps(kind)} is not supported (text, json_object, json_schema)")


def json_grammar() -> str:
    """Any JSON object, whitespace bounded (a model cannot run on in spaces after it)."""
    return llama_grammar.JSON_GBNF


def from_schema(schema) -> str:
    """The grammar of the JSON a schema describes (llama.cpp's converter, as llama-cpp-python
    ships it)."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 (the converter raises what its input provokes)
        raise GrammarError(f"this JSON schema cannot be enforced: {type(e).__name__}: {e}") from None


class Constraint:
    """One reply's progress through a grammar: which tokens it allows next, and the tokens
    chosen so far (accept). Made before the prompt is prefilled, so that a grammar that does
    not parse fails before anything has changed."""

    def __init__(self, vocab, n_vocab: int, gbnf: str):
        self._smpl = None
        if not isinstance(gbnf, str) or not gbnf.strip():
            raise GrammarError("a grammar must be non-empty GBNF text")
        self._vocab = vocab
        self._smpl = llama_c.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._smpl:
            raise GrammarError("the grammar does not parse as GBNF with a 'root' rule (llama.cpp's "
                               "parser logs where)")
        self._one = (llama_c.llama_token_data * 1)()
        self._one_array = llama_c.llama_token_data_array(self._one, 1, -1, False)
        self._all = np.zeros(n_vocab, _TOKEN_DATA)
        self._all["id"] = np.arange(n_vocab)

    def allows(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit = token, 0.0
        self._one_array.data, self._one_array.size = self._one, 1
        llama_c.llama_sampler_apply(self._smpl, ctypes.byref(self._one_array))
        return self._one[0].logit != -np.inf

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar refuses here at -inf."""
        self._all["logit"] = 0.0
        arr = llama_c.llama_token_data_array(self._all.ctypes.data_as(llama_c.llama_token_data_p),
                                             self._all.size, -1, False)
        llama_c.llama_sampler_apply(self._smpl, ctypes.byref(arr))
        refused = np.isneginf(self._all["logit"])
        if refused.all():
            raise GrammarError("the grammar allows no token here: it cannot be completed with this "
                               "model's vocabulary")
        out = np.array(logits, dtype=np.float64)
        out[refused[:out.size]] = -np.inf
        return out

    def accept(self, token: int) -> None:
        """A token the grammar allowed was chosen (an end-of-generation token ends the reply
        and is not fed on)."""
        if not llama_c.llama_vocab_is_eog(self._vocab, token):
            llama_c.llama_sampler_accept(self._smpl, token)

    def close(self) -> None:
        if self._smpl:
            llama_c.llama_sampler_free(self._smpl)
            self._smpl = None

    __del__ = close
