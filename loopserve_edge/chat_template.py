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


class ChatTemplate:
    def __init__(self, template: str | None, bos_token: str, eos_token: str):
        self.source = template or CHATML
        self.bos_token = bos_token
        self._fmt = Jinja2ChatFormatter(self.source, eos_token=eos_token, bos_token=bos_token,
                                        add_generation_prompt=True)

    def render(self, messages: list[dict]) -> str:
        """The whole conversation as the model sees it, ending with the assistant's cue."""
        return self._fmt(messages=messages).prompt
