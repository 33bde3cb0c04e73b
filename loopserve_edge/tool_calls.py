"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls` and `tool` messages) with
any chat template: the tools are described after the system prompt and a grammar holds the reply
to one JSON object, a call or (where the model may answer without one) a text reply:

    {"tool_call":{"name":"get_weather","arguments":{"city":"Paris"}}}
    {"tool_calls":[{"name":"get_weather","arguments":{...}},...]}     with parallel_tool_calls
    {"response":"It is sunny."}                                       tool_choice "auto" only

as llama-server does for templates without a tool format of their own ("generic" there). Tool
results come back as `tool` messages; consecutive ones become one user turn,
{"tool_results":[{"name":"get_weather","content":"..."}]}.

The reply must render back to the text the model generated: clients send the OpenAI message it
became in the next request's history, and only the same text finds the dialogue that holds it
(dialogue_store.py), so that nothing is prefilled again. Hence the wrapper has no optional
whitespace, a text reply only JSON's two-character escapes (what json.dumps writes back), and a
call's arguments are handed out as generated (the text after "arguments":), not re-serialized.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from llama_cpp import llama_grammar

from .errors import LoopServeError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TEXT_HEAD = '{"response":"'
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}


class ToolsError(LoopServeError, ValueError):
    """Tools, a tool choice or tool messages that cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict


@dataclass(frozen=True)
class ToolMode:
    """How a reply may use the tools: `callable` the names it may call (none with tool_choice
    "none"), `text` whether it may answer in text instead, `parallel` whether it may call
    several at once."""
    tools: tuple[Tool, ...]
    callable: tuple[str, ...]
    text: bool
    parallel: bool

    def prompt(self) -> str:
        """What the system prompt gains: the tools and the reply's forms. The same whatever the
        tool_choice (the grammar holds the reply to the forms it allows), so that a dialogue
        goes on in place when a client changes it from one request to the next."""
        listed = json.dumps([{"name": t.name, "description": t.description or "", "parameters": t.parameters}
                             for t in self.tools], ensure_ascii=False)
        call = ('{"tool_calls":[{"name":...,"arguments":{...}},...]} to call one or more of them'
                if self.parallel else '{"tool_call":{"name":...,"arguments":{...}}} to call one of them')
        return (f"You can use these tools (each one's arguments as a JSON schema):\n{listed}\n\n"
                f"Reply with one JSON object: {call}, or {TEXT_HEAD}...\"}} with your answer to the user. "
                'Tool results come back as {"tool_results":[{"name":...,"content":...}]}.')

    def grammar(self) -> str:
        """GBNF of the reply: llama.cpp's schema converter (as llama-cpp-python ships it) for each
        tool's arguments, the fixed wrapper around them written here."""
        conv = llama_grammar.SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        calls = []
        for i, t in enumerate(self.tools):
            if t.name not in self.callable:
                continue
            try:
                schema = conv.resolve_refs(json.loads(json.dumps(t.parameters)), f"tool{i}")
                args = conv.visit(schema, f"tool{i}-arguments")
            except Exception as e:  # noqa: BLE001 (the converter raises what its input provokes)
                raise ToolsError(f"tools[{i}].function.parameters cannot be enforced: {type(e).__name__}: {e}",
                                 f"tools[{i}].function.parameters") from None
            calls.append(f'"{{" {_lit(json.dumps("name"))} ":" {_lit(json.dumps(t.name))} "," '
                         f'{_lit(json.dumps("arguments"))} ":" {args} "}}"')
        rules, forms = dict(conv._rules), []
        if calls:
            rules["ls-call"] = " | ".join(f"( {c} )" for c in calls)
            forms.append(f'{_lit("{" + json.dumps("tool_calls") + ":[")} ls-call ( "," ls-call )* "]}}"'
                         if self.parallel else f'{_lit("{" + json.dumps("tool_call") + ":")} ls-call "}}"')
        if self.text:
            rules["ls-text-char"] = r'[^"\\\x00-\x1F] | "\\" ["\\nrtbf]'
            forms.append(f'{_lit(TEXT_HEAD)} ls-text-char* "\\"}}"')
        rules["root"] = " | ".join(f"( {f} )" for f in forms)
        return "\n".join(f"{k} ::= {v}" for k, v in rules.items())


def _lit(s: str) -> str:
    """A GBNF literal of s."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# -- the request ------------------------------------------------------------------------------

def mode(tools, choice, parallel) -> ToolMode | None:
    """The request's tools, tool_choice and parallel_tool_calls; None when no tools are offered
    (the reply is plain text). With tool_choice "none" the tools are still described and the
    reply is held to the text form: the prompt stays the one of the requests that may call them."""
    if tools is not None and not isinstance(tools, list):
        raise ToolsError("'tools' must be a list of tools", "tools")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolsError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    offered = tuple(_tool(t, i) for i, t in enumerate(tools or ()))
    names = [t.name for t in offered]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ToolsError(f"two tools are named {dup!r}", "tools")
    if choice is None:
        choice = "auto" if offered else "none"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolsError('a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
        if name not in names:
            raise ToolsError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        callable_, text = (name,), False
    elif choice in ("none", "auto", "required"):
        if not offered:
            if choice == "required":
                raise ToolsError('tool_choice "required" needs tools', "tool_choice")
            return None
        callable_, text = (() if choice == "none" else tuple(names)), choice != "required"
    else:
        raise ToolsError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                         '"function": {"name": ...}}', "tool_choice")
    return ToolMode(offered, callable_, text, bool(parallel))


def _tool(t, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
        raise ToolsError(f'{where} must be {{"type": "function", "function": {{"name": ...}}}}', where)
    fn = t["function"]
    name, desc, params = fn.get("name"), fn.get("description"), fn.get("parameters")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolsError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", f"{where}.function.name")
    if desc is not None and not isinstance(desc, str):
        raise ToolsError(f"{where}.function.description must be a string", f"{where}.function.description")
    if params is None:
        params = {"type": "object"}
    if not isinstance(params, dict):
        raise ToolsError(f"{where}.function.parameters must be a JSON schema (an object)",
                         f"{where}.function.parameters")
    return Tool(name, desc, params)


# -- messages as the model sees them ----------------------------------------------------------

def render_calls(calls: list[tuple[str, str]], parallel: bool) -> str:
    """(name, arguments as generated) -> the reply's text."""
    one = [f'{{"name":{json.dumps(n)},"arguments":{a}}}' for n, a in calls]
    if len(one) == 1 and not parallel:
        return '{"tool_call":' + one[0] + "}"
    return '{"tool_calls":[' + ",".join(one) + "]}"


def render_text(content: str) -> str:
    return '{"response":' + json.dumps(content, ensure_ascii=False) + "}"


def render_results(results: list[tuple[str, str]]) -> str:
    return json.dumps({"tool_results": [{"name": n, "content": c} for n, c in results]}, ensure_ascii=False,
                      separators=(",", ":"))


def assistant_calls(m: dict, where: str) -> list[tuple[str, str, str]]:
    """An assistant message's tool_calls as (id, name, arguments)."""
    calls = m.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise ToolsError(f"{where}.tool_calls must be a non-empty list", f"{where}.tool_calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if (not isinstance(fn, dict) or not isinstance(c.get("id"), str) or not isinstance(fn.get("name"), str)
                or not isinstance(fn.get("arguments"), str)):
            raise ToolsError(f'{where}.tool_calls[{j}] must be {{"id": ..., "type": "function", "function": '
                             '{"name": ..., "arguments": "<JSON text>"}}', f"{where}.tool_calls")
        try:
            json.loads(fn["arguments"])
        except ValueError:
            raise ToolsError(f"{where}.tool_calls[{j}].function.arguments is not JSON text",
                             f"{where}.tool_calls") from None
        out.append((c["id"], fn["name"], fn["arguments"]))
    return out


# -- the reply --------------------------------------------------------------------------------

CALL_HEAD, ARGS_HEAD = '{"name":"', '","arguments":'
FORMS = {TEXT_HEAD: "text", '{"tool_call":': "call", '{"tool_calls":[': "calls"}


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ReplyReader:
    """A reply's text read as it is generated, in the grammar's form, for streaming and for the
    whole reply alike: feed(piece) gives the message deltas (OpenAI's) that piece completes: a
    text reply's content as it comes; a call's id and name once its name is whole, then its
    arguments as they come (as generated, up to the call's closing brace). `done`: the reply
    is complete in its form (then `calls` are the calls' (id, name, arguments))."""

    def __init__(self):
        self.raw, self.pos = "", 0
        self.form: str | None = None   # "text", "call" (one), "calls" (parallel); None: not known yet
        self.state = "head"
        self.calls: list[list[str]] = []
        self.done = False
        # inside a call's arguments: nesting, a string, an escape
        self._depth, self._str, self._esc = 0, False, False

    def feed(self, piece: str) -> list[dict]:
        self.raw += piece
        out: list[dict] = []
        if self.form is None:
            head = next((h for h in FORMS if self.raw.startswith(h)), None)
            if head is None:
                return out
            self.form, self.pos = FORMS[head], len(head)
            self.state = "content" if self.form == "text" else "call"
        if self.form == "text":
            self._content(out)
        else:
            self._calls(out)
        return out

    def _content(self, out: list[dict]) -> None:
        raw, i, text = self.raw, self.pos, []
        while i < len(raw) and self.state == "content":
            c = raw[i]
            if c == "\\":
                if i + 1 >= len(raw):
                    break
                text.append(_ESCAPES.get(raw[i + 1], raw[i + 1]))
                i += 2
                continue
            if c == '"':
                self.state = "end"
            else:
                text.append(c)
            i += 1
        self.pos = i
        if self.state == "end" and raw[i:] == "}":
            self.done = True
        if text:
            out.append({"content": "".join(text)})

    def _calls(self, out: list[dict]) -> None:
        raw = self.raw
        while True:
            i = self.pos
            if self.state == "call":
                if len(raw) - i < len(CALL_HEAD):
                    return
                self.pos, self.state = i + len(CALL_HEAD), "name"
            elif self.state == "name":
                j = raw.find('"', i)
                if j < 0 or len(raw) - j < len(ARGS_HEAD):
                    return
                self.calls.append([call_id(), raw[i:j], ""])
                self.pos, self.state = j + len(ARGS_HEAD), "arguments"
                self._depth, self._str, self._esc = 0, False, False
                cid, name, _ = self.calls[-1]
                out.append(self._delta({"id": cid, "type": "function", "function": {"name": name, "arguments": ""}}))
            elif self.state == "arguments":
                while i < len(raw):
                    c = raw[i]
                    if self._str:
                        self._esc, self._str = (False, True) if self._esc else (c == "\\", c != '"')
                    elif c == '"':
                        self._str = True
                    elif c in "{[":
                        self._depth += 1
                    elif c in "}]":
                        if self._depth == 0:
                            break   # the call's own closing brace
                        self._depth -= 1
                    i += 1
                part = raw[self.pos:i]
                if part:
                    self.calls[-1][2] += part
                    out.append(self._delta({"function": {"arguments": part}}))
                self.pos = i
                if i == len(raw):
                    return
                self.pos, self.state = i + 1, "next"
            elif self.state == "next":
                if i >= len(raw):
                    return
                if raw[i] == "," and self.form == "calls":
                    self.pos, self.state = i + 1, "call"
                    continue
                self.state = "end"
                self.done = raw[i:] == ("]}" if self.form == "calls" else "}")
                return
            else:
                self.done = raw[self.pos:] == ("]}" if self.form == "calls" else "}")
                return

    def _delta(self, call: dict) -> dict:
        return {"tool_calls": [dict(call, index=len(self.calls) - 1)]}
