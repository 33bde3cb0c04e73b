"""Renders a dialogue's messages with the model's own chat template."""
from __future__ import annotations

import json

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from . import reasoning
from .errors import ChatTemplateError

# what the formatter itself gives a template: a request's chat_template_kwargs may not name them
RESERVED = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
                      "functions", "function_call", "tools", "tool_choice", "strftime_now"})

# For GGUFs that carry no template (tiny test models, some base models).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (the instruction-tuned Gemma 3 template: `<start_of_turn>user`/`model`,
# the system text before the first user message), for Gemma GGUFs that carry no template,
# such as the base gemma-3-270m. Its control tokens are in every Gemma vocabulary, and
# `<end_of_turn>` ends a reply there. Unlike Google's template it does not trim messages,
# so a reply's text stays a prefix of the next render and only the new turn is prefilled.
GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + (prefix if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Completion style, for base models prompted with worked examples rather than chat turns: a
# plain transcript, with no control tokens. The system text (instructions, examples) comes
# first; each user message ends with "Answer:" and the reply follows it on the same line (a
# reply prefix such as " The pass key is" gives it a start to complete). A base model never
# ends a turn by itself, so a reply stops at the end of its line (COMPLETION_STOPS).
COMPLETION = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ message['content'] + '\nAnswer:' }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
)
COMPLETION_STOPS = ("\n",)
FORMATS = ("chat", "completion")
FORMAT_CHOICES = ("auto",) + FORMATS


def resolve_format(fmt: str, template: str | None) -> str:
    """`auto`: `chat` for a GGUF that carries a chat template (an instruction-tuned model),
    `completion` for one that does not (most often a base model, which answers a transcript's
    cue where it rambles in turns it was never tuned on: Gemma-3-270M base). Other formats as
    given (Context and ChatTemplate.for_format refuse unknown ones)."""
    if fmt != "auto":
        return fmt
    return "chat" if template else "completion"


# general.architecture -> (name, template) used when the GGUF has no template
FALLBACKS = {"gemma": ("Gemma", GEMMA), "gemma2": ("Gemma", GEMMA), "gemma3": ("Gemma", GEMMA)}


def fallback(architecture: str | None) -> tuple[str, str]:
    """(name, template) for a GGUF without a chat template: its family's turn format where
    known, else ChatML."""
    return FALLBACKS.get(architecture or "", ("ChatML", CHATML))


class ChatTemplate:
    def __init__(self, template: str | None, bos_token: str, eos_token: str,
                 architecture: str | None = None, stops: tuple[str, ...] = ()):
        """`stops`: strings that end a reply in this format (besides the model's
        end-of-generation tokens)."""
        self.source = template or fallback(architecture)[1]
        self.bos_token = bos_token
        self.stops = tuple(stops)
        self._fmt = Jinja2ChatFormatter(self.source, eos_token=eos_token, bos_token=bos_token,
                                        add_generation_prompt=True)
        self._opens: dict[str, bool] = {}   # opens_thinking by kwargs

    @classmethod
    def for_format(cls, fmt: str, template: str | None, bos_token: str, eos_token: str,
                   architecture: str | None = None) -> "ChatTemplate":
        """`chat`: the GGUF's own template (or its family's turn format); `completion`: the
        plain transcript above, whatever the GGUF carries."""
        if fmt == "chat":
            return cls(template, bos_token, eos_token, architecture)
        if fmt == "completion":
            return cls(COMPLETION, bos_token, eos_token, stops=COMPLETION_STOPS)
        raise ValueError(f"unknown prompt format {fmt!r}; choose from {', '.join(FORMATS)}")

    def render(self, messages: list[dict], kwargs: dict | None = None) -> str:
        """The whole conversation as the model sees it, ending with the assistant's cue;
        `kwargs`: the template's own variables (llama-server's chat_template_kwargs, such as
        Qwen3's enable_thinking; names in RESERVED are the formatter's). A template's own refusal
        (`raise_exception`, which llama-cpp-python's formatter raises as ValueError: Gemma's and
        Mistral's templates refuse a conversation that opens with the assistant) is a
        ChatTemplateError naming it."""
        try:
            return self._fmt(messages=messages, **(kwargs or {})).prompt
        except (ValueError, jinja2.TemplateError) as e:
            raise ChatTemplateError(f"the model's chat template cannot render these messages: {e}") from None

    def opens_thinking(self, kwargs: dict | None = None) -> bool:
        """Whether the generation prompt opens a thinking block (DeepSeek-R1's template): a
        reasoning model's reply then starts inside it (reasoning.py)."""
        key = json.dumps(kwargs or {}, sort_keys=True, default=repr)   # (the Python API's values: any object)
        if key not in self._opens:
            try:
                self._opens[key] = reasoning.opens_thinking(self.render([{"role": "user", "content": "?"}], kwargs))
            except ChatTemplateError:
                self._opens[key] = False
        return self._opens[key]


class RawText:
    """Text completions (OpenAI's /v1/completions): the prompt is the text as given, with no
    turns or control tokens (the tokenizer adds BOS where the model wants one), and the reply
    continues it, ending at the model's end of generation or a stop string of the request."""
    stops: tuple[str, ...] = ()

    def __init__(self, bos_token: str):
        self.bos_token = bos_token

    def render(self, messages: list[dict], kwargs: dict | None = None) -> str:
        return "".join(m["content"] for m in messages)
