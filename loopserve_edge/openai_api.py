"""OpenAI's chat- and text-completions shapes, for the server and for `Llama.create_chat_completion`
/ `create_completion`: a request validated into a `ChatRequest` (`TextRequest`), the sampling it
asks for, the response, stream chunks and log-probability entries
(https://platform.openai.com/docs/api-reference/chat, .../completions).

Validation is by hand so that every error names the parameter (`RequestError`: the server
answers it as an OpenAI-style 400 body, the Python API raises it), never a framework's own
format or a traceback.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field, replace

import numpy as np

from . import grammar, reasoning, tool_calls
from .chat_template import RESERVED
from .config import LoopServeConfig
from .dialogue import TurnStats
from .errors import LoopServeError
from .sampling import RANDOM_SEED, Sampler, SamplingParams
from .sampling import logprobs as token_logprobs

# per-request LoopServe settings (the request's "loopserve" object) and their types
LOOPSERVE_FIELDS = {"policy": str, "budget": int, "interval": int, "window": int, "defer_cut": int,
                    "defer_scored": int, "granularity": str, "allocation": str, "span": int,
                    "sparse_prefill": bool, "alpha": float}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_CHOICES = 16   # `n`: each choice is a reply of its own, run one after another
# OpenAI takes 4 stop strings; llama-server and llama-cpp-python any number, and scoring tools
# send more (lm-eval's code tasks stop at 5 line starts)
MAX_STOPS = 32


class RequestError(LoopServeError, ValueError):
    """A request that cannot be run as given; `param` names the parameter at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class ChatRequest:
    model: str
    system: str | None                 # the leading system/developer message(s), joined
    history: tuple[dict, ...]          # user/assistant messages before the last one
    prompt: str                        # the last user message
    reply_prefix: str                  # the reply's start, given as a last assistant message
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    loopserve: dict = field(default_factory=dict)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None        # None: none asked; else top_logprobs (0-20)
    min_p: float | None = None         # llama-server's and llama-cpp-python's extension
    repeat_penalty: float | None = None  # llama-server's and llama-cpp-python's (sampling.py)
    repeat_last_n: int | None = None
    grammar: str | None = None         # the reply's form (GBNF): response_format, "grammar" as given, tools
    tools: tool_calls.ToolMode | None = None   # the reply is a tool call or text, in tool_calls.py's form
    n: int = 1                         # choices asked for (the server runs them one after another)
    reasoning_format: str | None = None  # llama-server's (reasoning.FORMATS); None: the server's
    chat_template_kwargs: dict = field(default_factory=dict)  # llama-server's: the template's own variables
    # how the reply's thinking is read (with_thinking): "off" (not split from the content),
    # "tagged" (a reply that starts with <think>), "open" (the prompt opened it)
    thinking: str = "off"


@dataclass(frozen=True)
class TextRequest(ChatRequest):
    """A text completion: `prompt` is the whole text, continued as it is (no turns)."""
    echo: bool = False                 # the response's text starts with the prompt
    # a prompt given as token ids: these (`prompt` is their text once resolve_text has run)
    prompt_tokens: tuple[int, ...] = ()

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the prompt's own tokens get log-probabilities too"""
        return self.echo and self.logprobs is not None


def _bad(msg: str, param: str | None, code: str | None = None) -> RequestError:
    return RequestError(msg, param, code)


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or (not integer and not math.isfinite(v)):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", name)
    if not lo <= v <= hi:
        raise _bad(f"'{name}' must be between {_num(lo)} and {_num(hi)}, got {v}", name)
    return v


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of parts of which only text is accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return text_parts(content, f"{where}.content")
    raise _bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def text_parts(parts: list, where: str, sep: str = "") -> str:
    """Parts ({"type": "text", "text": ...}; OpenAI's content parts, Anthropic's text blocks)
    as one text, `sep` between them; any other part is refused, naming `where`."""
    out = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{i}]: only text parts are supported", where)
        out.append(part["text"])
    return sep.join(out)


def given(body: dict, name: str, default):
    """body[name], or the default where it is missing or null (OpenAI's optional fields are
    nullable, and clients other than OpenAI's own send null for what they leave unset)."""
    v = body.get(name)
    return default if v is None else v


def _model(body, model: str | None) -> str:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    model = body.get("model", model) or model
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model")
    return model


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(body: dict) -> None:
    """A RequestError naming the field whose strings hold a lone UTF-16 surrogate: JSON's
    "\\ud800" escapes (and Python's reading of such bytes) give strings that are not Unicode
    text, which would fail wherever they are encoded (a 500 before). Run once where a body
    comes in (the server's reader, the Python API's calls); a stack, not recursion, so any
    nesting json.loads took is walked."""
    for k, v in body.items():
        stack = [k, v]
        while stack:
            x = stack.pop()
            if isinstance(x, str):
                m = _SURROGATE.search(x)
                if m:
                    raise _bad(f"{k!r} is not valid Unicode text: it holds a lone UTF-16 surrogate "
                               f"(\\u{ord(m.group()):04x})", None if x is k else k)
            elif isinstance(x, dict):
                stack.extend(x.keys())
                stack.extend(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)


def parse_chat(body: dict, model: str | None = None) -> ChatRequest:
    """A chat request's body (decoded JSON); `model`: the name to use when the body gives none
    (the Python API: the model's path; the server: the served model's name), None to require one."""
    model = _model(body, model)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' is required and must be a non-empty list", "messages")
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise _bad(f"'{legacy}' (OpenAI's older form) is not supported: give 'tools' and 'tool_choice'", legacy)
    try:
        tools = tool_calls.mode(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
        system, rest = _turns(msgs, tools, bool(body.get("parallel_tool_calls")))
    except tool_calls.ToolsError as e:
        raise _bad(str(e), e.param) from None
    # a last assistant message is the start of the reply, which the model continues (as
    # llama-server does); the response holds the continuation
    reply_prefix = rest.pop()["content"] if rest and rest[-1]["role"] == "assistant" else ""
    if not rest:
        raise _bad("the conversation must have a user message", "messages")
    gen = _generation(body, _logprobs(body))
    if tools is not None:
        if gen["grammar"]:
            raise _bad("give either tools (with a tool_choice other than \"none\") or a reply form "
                       "(response_format, grammar), not both", "response_format")
        try:
            gen["grammar"] = tools.grammar()
        except tool_calls.ToolsError as e:
            raise _bad(str(e), e.param) from None
        system = tools.prompt() if system is None else f"{system}\n\n{tools.prompt()}"
    if reply_prefix and gen["grammar"]:
        raise _bad("a reply held to a form (response_format, grammar, tools) cannot continue a last "
                   "assistant message: it is held from its first token", "messages")
    fmt = body.get("reasoning_format")
    if fmt is not None and fmt not in reasoning.FORMATS:
        raise _bad(f"'reasoning_format' must be one of {', '.join(reasoning.FORMATS)}", "reasoning_format")
    return ChatRequest(model=model, system=system, history=tuple(rest[:-1]), prompt=rest[-1]["content"],
                       reply_prefix=reply_prefix, tools=tools, reasoning_format=fmt,
                       chat_template_kwargs=_template_kwargs(body.get("chat_template_kwargs")), **gen)


def _template_kwargs(v) -> dict:
    """llama-server's chat_template_kwargs: variables the chat template reads (Qwen3's and
    SmolLM3's enable_thinking), none of the formatter's own."""
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _bad("'chat_template_kwargs' must be an object (names to values)", "chat_template_kwargs")
    taken = sorted(set(v) & RESERVED)
    if taken:
        raise _bad(f"'chat_template_kwargs' may not set {', '.join(taken)}: the server gives the template those",
                   "chat_template_kwargs")
    return dict(v)


def with_thinking(req: ChatRequest, default_format: str, template) -> ChatRequest:
    """The request with its reply's thinking to be read apart (reasoning.py) or not: its own
    reasoning_format, else `default_format`; "open" where the model's chat template (rendered with
    the request's kwargs) opens the block in its generation prompt. A reply held to a form from
    its first token (a grammar, tools) and a text completion have none."""
    fmt = req.reasoning_format or default_format
    if fmt == "none" or req.grammar is not None or isinstance(req, TextRequest):
        return replace(req, thinking="off")
    opened = not req.reply_prefix and template.opens_thinking(req.chat_template_kwargs)
    return replace(req, thinking="open" if opened else "tagged")


def answer_only(req: ChatRequest, dialogue) -> None:
    """After a turn whose thinking was read apart: the dialogue's reply message is the answer, as
    the client has it and sends it back (the history then matches; the template renders it as it
    renders a past reply), and the turn's reasoning_tokens are counted."""
    if req.thinking == "off" or not dialogue.messages or dialogue.messages[-1]["role"] != "assistant":
        return
    opened = req.thinking == "open"
    msg = dialogue.messages[-1]
    msg["content"] = reasoning.split(msg["content"], opened)[1]
    if dialogue.last_stats is not None:
        n = reasoning.thinking_tokens([dialogue.llm._piece(t) for t in dialogue.reply_tokens], opened)
        dialogue.last_stats = replace(dialogue.last_stats, reasoning_tokens=n)


def _turns(msgs: list, tools: tool_calls.ToolMode | None, parallel: bool) -> tuple[str | None, list[dict]]:
    """The system text and the turns, user and assistant alternating (messages of one role in
    a row joined into one turn; the first may be the assistant's, an opening such as a chat
    page's greeting, which OpenAI takes too), as the model sees them:
    an assistant message's tool calls and the tool messages answering them in the form the
    tools' grammar gives (tool_calls.py); with tools in use, a text reply in its form too."""
    system_parts, rest = [], []
    calls: dict[str, str] = {}               # id -> name: the calls of the last assistant message
    results: list[tuple[str, str]] = []      # the tool messages since it
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        role = m["role"]
        if role in ("system", "developer"):
            if rest or results:
                raise _bad(f"{where}: system messages must come before the conversation", f"{where}.role")
            system_parts.append(_text(m.get("content"), where))
            continue
        if role == "tool":
            if not calls:
                raise _bad(f"{where}: a tool message answers a call of the assistant message before it, "
                           "which has none", f"{where}.role")
            if m.get("tool_call_id") not in calls:
                raise _bad(f"{where}.tool_call_id must be the id of a call of the assistant message before it",
                           f"{where}.tool_call_id")
            results.append((calls[m["tool_call_id"]], _text(m.get("content"), where)))
            continue
        # tool results, then a user message: one turn; so are messages of one role in a row
        # (two user messages, as OpenAI's API takes them, or a reply sent in parts): the
        # dialogue is a sequence of turns, and a blank line joins them as a template would
        # separate them. An assistant message with tool calls stays a turn of its own.
        merge = bool(results) and role == "user" or not results and not calls and rest and \
            rest[-1]["role"] == role and not (role == "assistant" and m.get("tool_calls"))
        if results:
            rest.append({"role": "user", "content": tool_calls.render_results(results)})
            results = []
        calls = {}
        if role == "assistant" and m.get("tool_calls"):
            got = tool_calls.assistant_calls(m, where)
            calls = {cid: name for cid, name, _ in got}
            text = tool_calls.render_calls([(name, args) for _, name, args in got], parallel)
        else:
            text = _text(m.get("content"), where)
            if role == "assistant" and tools is not None:
                text = tool_calls.render_text(text)
        if merge:
            rest[-1]["content"] += "\n\n" + text
            continue
        opening = rest[0]["role"] == "assistant" if rest else role == "assistant"
        want = "user" if (len(rest) + opening) % 2 == 0 else "assistant"
        if role != want:
            raise _bad(f"{where}: expected a {want} message (turns alternate)", f"{where}.role")
        if not rest and calls:
            raise _bad(f"{where}: a tool call answers a user message, and none comes before it", f"{where}.role")
        rest.append({"role": role, "content": text})
    if results:
        rest.append({"role": "user", "content": tool_calls.render_results(results)})
    elif calls:
        raise _bad("the conversation ends with tool calls: their results come next, as tool messages",
                   "messages")
    return ("\n\n".join(system_parts) if system_parts else None), rest


def parse_text(body: dict, model: str | None = None) -> TextRequest:
    """A text completion request's body, as parse_chat: one prompt."""
    reqs = parse_texts(body, model)
    if len(reqs) > 1:
        raise _bad("one prompt per call here (the server takes several, each its own choice)", "prompt")
    return reqs[0]


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_texts(body: dict, model: str | None = None) -> list[TextRequest]:
    """A text completion request's body: a request per prompt, which OpenAI's `prompt` gives as
    a string, token ids, or a list of either (several prompts, a choice each)."""
    model = _model(body, model)
    prompt = body.get("prompt")
    several = isinstance(prompt, list) and bool(prompt) and not _is_ids(prompt)
    prompts = prompt if several else [prompt]
    for p in prompts:
        if not (isinstance(p, str) or _is_ids(p)):
            raise _bad("'prompt' must be a string, a list of token ids, or a list of either", "prompt")
        if p == "":
            raise _bad("'prompt' must not be empty", "prompt")
        if isinstance(p, list) and min(p) < 0:
            raise _bad("'prompt' token ids must not be negative", "prompt")
    echo = given(body, "echo", False)
    if not isinstance(echo, bool):
        raise _bad("'echo' must be a boolean", "echo")
    if body.get("suffix"):
        raise _bad("'suffix' (fill in the middle) is not supported", "suffix")
    if given(body, "best_of", 1) != 1:
        raise _bad("only best_of=1 is supported", "best_of")
    logprobs = _number(body, "logprobs", 0, 20, integer=True)
    # max_tokens 0 with echo: the prompt alone, as scoring tools ask for its log-probabilities
    gen = _generation(body, logprobs, min_tokens=0 if echo else 1)
    if echo and logprobs is not None and gen["stream"]:
        raise _bad("'echo' with 'logprobs' (the prompt's log-probabilities) is not streamed: ask without "
                   "'stream'", "stream")
    return [TextRequest(model=model, system=None, history=(), prompt=p if isinstance(p, str) else "",
                        prompt_tokens=() if isinstance(p, str) else tuple(p), reply_prefix="", echo=echo, **gen)
            for p in prompts]


def resolve_text(req: TextRequest, llm) -> TextRequest:
    """A prompt given as token ids gets their text, which the dialogue goes on from (a leading
    BOS left to the tokenizer, which adds it where the model wants one); the ids stay, for the
    prompt's log-probabilities (an entry each)."""
    if not req.prompt_tokens:
        return req
    ids = list(req.prompt_tokens)
    if max(ids) >= llm.n_vocab:
        raise _bad(f"'prompt': token {max(ids)} is beyond the model's vocabulary ({llm.n_vocab} tokens)", "prompt")
    text = ids[1:] if llm.add_bos and ids[0] == llm.bos_id else ids   # the tokenizer adds BOS again
    if not text:
        raise _bad("'prompt' must not be empty", "prompt")
    return replace(req, prompt=llm.detokenize(text, special=True))


def prompt_logprobs(llm, req: TextRequest) -> list[dict]:
    """The prompt's tokens as log-probability entries (LogprobCursor's), each scored after the
    tokens before it (Context.prompt_logprobs): an entry per token id given (a BOS among them
    too, its text empty, as the echoed text has none), or per token of the text. The first has
    none, unless the model starts with a BOS the prompt did not give, which it is scored after."""
    return _scored(llm, req)[0]


def _scored(llm, req: TextRequest) -> tuple[list[dict], np.ndarray, list[int], int]:
    """prompt_logprobs, the logits after the prompt, the tokens it was scored as and how many
    of them the last scored text's cells served."""
    ids = list(req.prompt_tokens) or llm.tokenize(req.prompt, add_bos=False)
    given_bos = llm.add_bos and ids[0] == llm.bos_id
    head = [llm.bos_id] if llm.add_bos and not given_bos else []
    scored, last, reused = llm.prompt_logprobs(head + ids, req.logprobs)
    out = [] if head else [dict(logprob_entry(llm._piece(ids[0], special=not given_bos), None), top_logprobs=None)]
    for tok, lp, best in scored:
        out.append(_entry(llm, tok, lp, best, special=True))
    return out, last, head + ids, reused


def scores_only(req: ChatRequest) -> bool:
    """A scored text asking for at most one token, held to no form and no stop string: what
    scoring tools send, thousands of texts none of which goes on. The scoring pass answers it
    alone (score_text), no dialogue made or prefilled."""
    return (isinstance(req, TextRequest) and req.scores_prompt and req.max_tokens is not None
            and req.max_tokens <= 1 and not req.grammar and not req.stop)


def score_text(llm, req: TextRequest, sampling: dict) -> tuple[str, TurnStats, list[dict]]:
    """A scores_only request: (the reply, its TurnStats, the entries), the one token asked for
    chosen from the logits after the prompt as a dialogue's reply would choose it."""
    t0 = time.perf_counter()
    entries, last, ids, reused = _scored(llm, req)
    text, finish, done = "", "length", 0
    if req.max_tokens == 1:
        tok = Sampler(SamplingParams(**sampling), None, history=ids)(last)
        special = llm.is_eog(tok)   # an end token: not part of the text, its entry's text empty
        entries.append(_entry(llm, *token_logprobs(last, tok, req.logprobs), special=False))
        if special:
            finish = "stop"
        else:
            text, done = llm._piece(tok, special=False).decode("utf-8", errors="replace"), 1
    took = time.perf_counter() - t0
    stats = TurnStats(prompt_tokens=len(ids), reused_tokens=reused, prefilled_tokens=len(ids) - reused, ttft_s=took,
                      decode_tokens=done, decode_s=0.0, kv_cells=0, kv_capacity=llm.n_ctx, finish_reason=finish,
                      swapped_in=False)
    return text, stats, entries


def scored_reply(llm, head: list[dict], reply: list[dict] | None, dialogue) -> list[dict]:
    """A scored text's entries (echo with logprobs): the prompt's (`head`), the reply's, and
    the end-of-generation token's that ended the reply where one did (its text empty): OpenAI's
    legacy completions list the end token, and scoring tools take the prompt's entries as all
    but the last (lm-eval asks for one token and drops it)."""
    e = dialogue.end_logprob
    return head + (reply or []) + ([] if e is None else [_entry(llm, *e, special=False)])


def _entry(llm, tok: int, lp: float, best, special: bool) -> dict:
    return dict(logprob_entry(llm._piece(tok, special=special), lp), top_logprobs=[
        logprob_entry(llm._piece(t, special=False), x) for t, x in best])


def _generation(body: dict, logprobs: int | None, min_tokens: int = 1) -> dict:
    """The fields chat and text completions share: length, sampling, stops, streaming."""
    n = _number(body, "n", 1, MAX_CHOICES, integer=True) or 1
    max_tokens = _number(body, "max_completion_tokens", min_tokens, 1 << 20, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", min_tokens, 1 << 20, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    if any(not s for s in stop):
        raise _bad("'stop' strings must not be empty", "stop")
    stream = given(body, "stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(given(opts, "include_usage", False), bool):
        raise _bad("'stream_options' must be an object with a boolean include_usage", "stream_options")
    return dict(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 0, 2), top_p=_number(body, "top_p", 0, 1),
        top_k=_number(body, "top_k", 0, 1 << 20, integer=True),
        seed=_seed(body), stop=stop, stream=stream,
        include_usage=bool(opts.get("include_usage", False)), loopserve=_loopserve(body.get("loopserve")),
        presence_penalty=_number(body, "presence_penalty", -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", -2, 2),
        logit_bias=_logit_bias(body.get("logit_bias")), logprobs=logprobs, min_p=_number(body, "min_p", 0, 1),
        repeat_penalty=_repeat_penalty(body), repeat_last_n=_number(body, "repeat_last_n", -1, 1 << 30, integer=True),
        grammar=_form(body), n=n)


def _repeat_penalty(body: dict) -> float | None:
    v = _number(body, "repeat_penalty", 0, 100)
    if v is not None and v <= 0:
        raise _bad(f"'repeat_penalty' must be above 0 (1: off), got {v}", "repeat_penalty")
    return v


def _form(body: dict) -> str | None:
    """The grammar the reply is held to: OpenAI's response_format (a JSON object, or one a JSON
    schema describes), or llama-server's and llama-cpp-python's "grammar" (GBNF text)."""
    fmt, gbnf = body.get("response_format"), body.get("grammar")
    if gbnf is not None and not isinstance(gbnf, str):
        raise _bad("'grammar' must be a string of GBNF rules", "grammar")
    try:
        from_fmt = grammar.for_response_format(fmt)
    except grammar.GrammarError as e:
        raise _bad(str(e), "response_format") from None
    if from_fmt is not None and gbnf:
        raise _bad("give either 'response_format' or 'grammar', not both", "grammar")
    return from_fmt or gbnf or None


def _logit_bias(v) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} with biases in -100..100 (the ids are checked against the
    model's vocabulary by the engine)."""
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise _bad("'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
    out = []
    for k, b in v.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit()):
            raise _bad(f"'logit_bias' keys must be token ids, got {k!r}", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise _bad(f"'logit_bias' values must be numbers between -100 and 100, got {json.dumps(b)}",
                       "logit_bias")
        out.append((int(k), float(b)))
    return tuple(out)


def _logprobs(body: dict) -> int | None:
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
        raise _bad("'logprobs' must be a boolean", "logprobs")
    top = _number(body, "top_logprobs", 0, 20, integer=True)
    if top is not None and not on:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if on else None


def _seed(body: dict) -> int | None:
    """-1 is llama.cpp's "random" (llama-server's and llama-cpp-python's): none, so that each of
    `n` choices is random too."""
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    return None if seed == RANDOM_SEED else seed


def _loopserve(v) -> dict:
    """The request's LoopServe settings, checked by type here and by LoopServeConfig later."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad("'loopserve' must be an object", "loopserve")
    for k, x in v.items():
        t = LOOPSERVE_FIELDS.get(k)
        if t is None:
            raise _bad(f"unknown loopserve setting {k!r}; known: {', '.join(LOOPSERVE_FIELDS)}", f"loopserve.{k}")
        if not (_is(x, t) or (k in ("budget", "defer_scored") and x is None)):
            raise _bad(f"loopserve.{k} must be of type {t.__name__}", f"loopserve.{k}")
    return dict(v)


def _is(x, t) -> bool:
    if t is bool or isinstance(x, bool):
        return t is bool and isinstance(x, bool)
    return isinstance(x, (int, float)) if t is float else isinstance(x, t)


def merged_config(base: LoopServeConfig, settings: dict) -> LoopServeConfig:
    """base with the request's settings; a combination LoopServeConfig refuses is a 400."""
    if not settings:
        return base
    d = base.to_dict()
    d.update(settings)
    if "interval" not in settings and "budget" in settings:
        d["interval"] = None    # derived from the budget again
    if "policy" not in settings and "budget" in settings and (base.policy == "full" or settings["budget"] is None):
        d["policy"] = None      # a budget alone: loopserve; none: full (LoopServeConfig)
    if settings.get("policy") == "full" and "budget" not in settings:
        d["budget"] = None      # the server's budget does not go with "full"
    if "defer_cut" not in settings:
        d["defer_cut"] = None
    try:
        return LoopServeConfig.from_dict(d)
    except ValueError as e:
        raise _bad(f"loopserve settings: {e}", "loopserve") from None


def sampling(req: ChatRequest, *, max_tokens: int, temperature: float, top_p: float, top_k: int,
             n_vocab: int, min_p: float = 0.0) -> dict:
    """Dialogue.send's sampling arguments: the request's, else the given defaults."""
    bad = [t for t, _ in req.logit_bias if t >= n_vocab]
    if bad:
        raise _bad(f"logit_bias: token {bad[0]} is beyond the model's vocabulary ({n_vocab} tokens)",
                   "logit_bias")
    return dict(max_tokens=max_tokens if req.max_tokens is None else req.max_tokens,
                temperature=temperature if req.temperature is None else req.temperature,
                top_p=top_p if req.top_p is None else req.top_p, top_k=top_k if req.top_k is None else req.top_k,
                min_p=min_p if req.min_p is None else req.min_p,
                seed=req.seed, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, logit_bias=req.logit_bias, logprobs=req.logprobs,
                repeat_penalty=1.0 if req.repeat_penalty is None else req.repeat_penalty,
                repeat_last_n=64 if req.repeat_last_n is None else req.repeat_last_n, grammar=req.grammar)


FINISH = {"stop": "stop", "length": "length", "context_full": "length"}


def completion_id(text: bool = False) -> str:
    return ("cmpl-" if text else "chatcmpl-") + uuid.uuid4().hex[:24]


def usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.decode_tokens,
            "total_tokens": stats.prompt_tokens + stats.decode_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens},
            "completion_tokens_details": {"reasoning_tokens": stats.reasoning_tokens}}


def extras(dialogue_id: str, stats) -> dict:
    """What the response adds to OpenAI's shape (clients ignore unknown fields)."""
    return {"dialogue_id": dialogue_id, "kv_cells": stats.kv_cells, "kv_evicted": stats.kv_evicted,
            "ttft_s": round(stats.ttft_s, 4), "prefill_chunks": stats.prefill_chunks}


def logprob_entry(piece: bytes, logprob: float) -> dict:
    return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}


class LogprobCursor:
    """A reply's log-probability entries, handed out as its text is: take(upto) gives those of
    the tokens not handed out yet that start before byte `upto` of the reply (the text emitted
    so far; at the end, the whole reply, so that the tokens of a stop string it was cut before
    are left out)."""

    def __init__(self, llm, dialogue):
        self.llm, self.dialogue = llm, dialogue
        self.sent = 0   # entries handed out
        self.byte = 0   # the reply's byte where the next one's token starts

    def take(self, upto: int) -> list[dict] | None:
        got = self.dialogue.reply_logprobs
        if got is None:
            return None
        out = []
        while self.sent < len(got) and self.byte < upto:
            e = _entry(self.llm, *got[self.sent], special=False)
            out.append(e)
            self.sent += 1
            self.byte += len(e["bytes"])
        return out


def _logprobs_field(content: list[dict] | None) -> dict | None:
    return None if content is None else {"content": content, "refusal": None}


def response(cid: str, model: str, fingerprint: str, text: str, stats, dialogue_id: str,
             logprobs: list[dict] | None = None, tools: bool = False, thinking: str = "off") -> dict:
    """`tools`: the reply is in tool_calls.py's form: a call becomes the message's tool_calls,
    a text reply its content (cut short: what there is of either; a reply in neither form, its
    text as it is). `thinking` (ChatRequest's): a reply that thinks has its thinking as the
    message's reasoning_content, its answer as the content."""
    message, finish = {"role": "assistant", "content": text}, FINISH[stats.finish_reason]
    if thinking != "off":
        thought, message["content"] = reasoning.split(text, thinking == "open")
        if thought is not None:
            message["reasoning_content"] = thought
    if tools:
        reader = tool_calls.ReplyReader()
        deltas = reader.feed(text)
        if reader.form == "text":
            message["content"] = "".join(d["content"] for d in deltas)
        elif reader.form is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [_call(c) for c in reader.calls]}
            finish = "tool_calls" if reader.done else finish
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": message, "logprobs": _logprobs_field(logprobs),
                         "finish_reason": finish}],
            "usage": usage(stats), "loopserve": extras(dialogue_id, stats)}


def _call(c: tuple[str, str, str]) -> dict:
    cid, name, arguments = c
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def chunk(cid: str, model: str, fingerprint: str, delta: dict, finish: str | None = None,
          logprobs: list[dict] | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": _logprobs_field(logprobs),
                         "finish_reason": finish}]}


def usage_chunk(cid: str, model: str, fingerprint: str, stats, dialogue_id: str) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return dict(chunk(cid, model, fingerprint, {}), choices=[], usage=usage(stats),
                loopserve=extras(dialogue_id, stats))



# -- text completions ---------------------------------------------------------------------

def text_logprobs(entries: list[dict] | None, offset: int) -> dict | None:
    """Text completions' log-probabilities (the legacy form) from the chat form's entries;
    `offset`: the characters of the response's text before the first entry's token."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top_logprobs"] is None else _top(e["top_logprobs"]) for e in entries],
            "text_offset": offsets}


def _top(best: list[dict]) -> dict:
    """{token text: log-probability}, most likely first; of tokens that read alike (bytes of
    an unfinished character), the most likely one's."""
    out: dict[str, float] = {}
    for t in best:
        out.setdefault(t["token"], t["logprob"])
    return out


def text_response(cid: str, model: str, fingerprint: str, text: str, stats, dialogue_id: str,
                  logprobs: dict | None = None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                         "finish_reason": FINISH[stats.finish_reason]}],
            "usage": usage(stats), "loopserve": extras(dialogue_id, stats)}


def merge_responses(responses: list[dict], one_prompt: bool) -> dict:
    """Several replies' responses as OpenAI gives them for one call: a choice each, in order,
    the completion tokens summed, and the prompt's tokens counted once where every reply
    answered the same prompt (`n` choices), else summed (several text prompts); the
    `loopserve` extras: the first's, with each reply's dialogue id."""
    out = dict(responses[0], choices=[dict(r["choices"][0], index=i) for i, r in enumerate(responses)])
    out["usage"] = sum_usage([r["usage"] for r in responses], one_prompt)
    out["loopserve"] = dict(responses[0]["loopserve"], dialogue_ids=[r["loopserve"]["dialogue_id"] for r in responses])
    return out


def sum_usage(usages: list[dict], one_prompt: bool) -> dict:
    """Several replies' usage as one call's: the completion tokens summed, the prompt's counted
    once where every reply answered the same prompt (`n` choices), else summed."""
    prompts = usages[:1] if one_prompt else usages
    done = sum(u["completion_tokens"] for u in usages)
    n_prompt = sum(u["prompt_tokens"] for u in prompts)
    return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done,
            "prompt_tokens_details": {"cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"]
                                                           for u in prompts)},
            "completion_tokens_details": {"reasoning_tokens": sum(u["completion_tokens_details"]["reasoning_tokens"]
                                                                  for u in usages)}}


def run_order(reqs: list[ChatRequest]) -> list[int]:
    """The order in which to run several requests of one call: scoring requests (scores_only)
    by their prompts, so that prompts that start alike follow one another and each is scored
    from where it leaves the last (Context.prompt_logprobs keeps the last scored text: lm-eval
    batches a question's answers among others' of the same length); any other as given."""
    if len(reqs) > 1 and all(scores_only(r) for r in reqs):
        return sorted(range(len(reqs)), key=lambda i: (tuple(reqs[i].prompt_tokens), reqs[i].prompt))
    return list(range(len(reqs)))


def choices(req: ChatRequest) -> list[ChatRequest]:
    """A request per choice of `n`: the first as asked, each next one with the next seed (the
    same seed would give the same reply)."""
    return [replace(req, n=1, seed=None if req.seed is None else req.seed + i) for i in range(req.n)]


def text_chunk(cid: str, model: str, fingerprint: str, text: str, finish: str | None = None,
               logprobs: dict | None = None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}


def text_usage_chunk(cid: str, model: str, fingerprint: str, stats, dialogue_id: str) -> dict:
    return dict(text_chunk(cid, model, fingerprint, ""), choices=[], usage=usage(stats),
                loopserve=extras(dialogue_id, stats))



# -- one request's shapes -------------------------------------------------------------------

class ChatShapes:
    """A chat request's response and stream chunks, from its reply, TurnStats and the
    log-probability entries that come with the reply or with each piece (the server and the
    Python API build both kinds of answer through these five calls; end's `did`, the dialogue's
    id, is for the Responses API's shapes, start's `prompt`, the prompt's tokens and those of
    them reused, for the Messages API's). With tools, the stream gives a text reply's content,
    or a call's name and then its arguments, as they come."""

    done_marker = True   # a stream ends with "data: [DONE]"

    def __init__(self, req: ChatRequest, fingerprint: str):
        self.req, self.cid, self.fp = req, completion_id(), fingerprint
        self.reader = tool_calls.ReplyReader() if req.tools is not None else None
        # a reply's thinking as reasoning_content deltas (with_thinking)
        self.thinking = None if req.thinking == "off" else reasoning.Splitter(req.thinking == "open")
        self.held: list[dict] | None = None   # log-probabilities of pieces that showed nothing yet

    def response(self, text: str, stats, did: str, logprobs) -> dict:
        return response(self.cid, self.req.model, self.fp, text, stats, did, logprobs, self.reader is not None,
                        self.req.thinking)

    def start(self, prompt: tuple[int, int] | None = None) -> list[dict]:
        return [chunk(self.cid, self.req.model, self.fp, {"role": "assistant", "content": ""})]

    def piece(self, text: str, logprobs) -> list[dict]:
        if self.reader is None and self.thinking is None:
            return [chunk(self.cid, self.req.model, self.fp, {"content": text}, logprobs=logprobs)]
        if logprobs is not None:
            self.held = (self.held or []) + logprobs
        if self.thinking is not None:
            return [self._chunk(d) for d in _thinking_deltas(self.thinking.feed(text))]
        return [self._chunk(d) for d in self.reader.feed(text)]

    def _chunk(self, delta: dict) -> dict:
        """A chunk with the log-probabilities held so far (those of the tokens it completes)."""
        logprobs, self.held = self.held, None
        return chunk(self.cid, self.req.model, self.fp, delta, logprobs=logprobs)

    def end(self, stats, logprobs, did: str | None = None) -> list[dict]:
        finish, out = FINISH[stats.finish_reason], []
        if self.thinking is not None:
            if logprobs is not None:
                self.held = (self.held or []) + logprobs
            out += [self._chunk(d) for d in _thinking_deltas(self.thinking.finish())]
            logprobs, self.held = self.held, None
        if self.reader is not None:
            if logprobs is not None:
                self.held = (self.held or []) + logprobs
            if self.reader.form is None and self.reader.raw:
                out.append(self._chunk({"content": self.reader.raw}))   # in neither form: as it is
            if self.reader.form in ("call", "calls") and self.reader.done:
                finish = "tool_calls"
            logprobs = self.held
            self.held = None
        out.append(chunk(self.cid, self.req.model, self.fp, {}, finish, logprobs or None))
        return out

    def usage(self, stats, did: str) -> dict:
        return usage_chunk(self.cid, self.req.model, self.fp, stats, did)


def _thinking_deltas(parts: list[tuple[str, str]]) -> list[dict]:
    return [{"reasoning_content" if kind == "reasoning" else "content": text} for kind, text in parts]


class StreamChoices:
    """Several choices' shapes (`n`, several text prompts) as one stream, the choices one after
    another (the server runs them so): each chunk with its choice's index and the first
    choice's id, and one usage chunk at the end, summed as merge_responses sums a response's."""

    done_marker = True

    def __init__(self, shapes: list, one_prompt: bool):
        self.shapes, self.one_prompt, self.cid = shapes, one_prompt, shapes[0].cid
        self.i = 0                 # the choice whose chunks come now
        self.ends: list = []       # (TurnStats, dialogue id) of the choices done

    def _mark(self, chunks: list[dict]) -> list[dict]:
        for c in chunks:
            c["id"] = self.cid
            for choice in c["choices"]:
                choice["index"] = self.i
        return chunks

    def start(self, prompt: tuple[int, int] | None = None) -> list[dict]:
        return self._mark(self.shapes[self.i].start(prompt))

    def piece(self, text: str, logprobs) -> list[dict]:
        return self._mark(self.shapes[self.i].piece(text, logprobs))

    def end(self, stats, logprobs, did: str | None = None) -> list[dict]:
        out = self._mark(self.shapes[self.i].end(stats, logprobs, did))
        self.ends.append((stats, did))
        self.i += 1
        return out

    def usage(self, stats, did: str) -> dict:
        first, first_did = self.ends[0]
        c = dict(self.shapes[0].usage(first, first_did), id=self.cid)
        c["usage"] = sum_usage([usage(s) for s, _ in self.ends], self.one_prompt)
        c["loopserve"] = dict(c["loopserve"], dialogue_ids=[d for _, d in self.ends])
        return c


class TextShapes:
    """A text completion's, as ChatShapes; the log-probabilities in the legacy form, their text
    offsets counted across the chunks."""
    done_marker = True

    def __init__(self, req: TextRequest, fingerprint: str):
        self.req, self.cid, self.fp = req, completion_id(text=True), fingerprint
        self.offset = len(req.prompt) if req.echo else 0

    def response(self, text: str, stats, did: str, logprobs) -> dict:
        """`logprobs`: the reply's entries, led by the prompt's where the request scores it."""
        start = self.req.prompt if self.req.echo else ""
        return text_response(self.cid, self.req.model, self.fp, start + text, stats, did,
                             text_logprobs(logprobs, 0 if self.req.scores_prompt else len(start)))

    def start(self, prompt: tuple[int, int] | None = None) -> list[dict]:
        return [text_chunk(self.cid, self.req.model, self.fp, self.req.prompt)] if self.req.echo else []

    def piece(self, text: str, logprobs) -> list[dict]:
        c = text_chunk(self.cid, self.req.model, self.fp, text, logprobs=text_logprobs(logprobs, self.offset))
        self.offset += len(text)
        return [c]

    def end(self, stats, logprobs, did: str | None = None) -> list[dict]:
        return [text_chunk(self.cid, self.req.model, self.fp, "", FINISH[stats.finish_reason],
                           text_logprobs(logprobs or None, self.offset))]

    def usage(self, stats, did: str) -> dict:
        return text_usage_chunk(self.cid, self.req.model, self.fp, stats, did)
