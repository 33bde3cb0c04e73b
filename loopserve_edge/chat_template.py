"""Renders a dialogue's messages with the model's own chat template."""
from __future__ import annotations

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

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

# general.architecture -> (name, template) used when the GGUF has no template
FALLBACKS = {"gemma": ("Gemma", GEMMA), "gemma2": ("Gemma", GEMMA), "gemma3": ("Gemma", GEMMA)}


def fallback(architecture: str | None) -> tuple[str, str]:
    """(name, template) for a GGUF without a chat template: its family's turn format where
    known, else ChatML."""
    return FALLBACKS.get(architecture or "", ("ChatML", CHATML))


class ChatTemplate:
    def __init__(self, template: str | None, bos_token: str, eos_token: str,
                 architecture: str | None = None):
        self.source = template or fallback(architecture)[1]
        self.bos_token = bos_token
        self._fmt = Jinja2ChatFormatter(self.source, eos_token=eos_token, bos_token=bos_token,
                                        add_generation_prompt=True)

    def render(self, messages: list[dict]) -> str:
        """The whole conversation as the model sees it, ending with the assistant's cue."""
        return self._fmt(messages=messages).prompt
