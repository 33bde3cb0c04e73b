"""`Llama`: the object users hold: a `Context` (one model, one llama.cpp context, several
KV sequences) with dialogues on top, the eviction policy of its `LoopServeConfig`, and the
state files dialogues are saved to.

Layers, each importing only those before it: context.py (llama.cpp) -> eviction.py (which
cells to keep) -> dialogue.py (turns) -> dialogue_store.py, completions.py (dialogues
found from OpenAI-style requests) -> llama.py (dialogues of one model).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from . import paths, state_file
from .completions import Completions
from .config import LoopServeConfig
from .context import Context
from .dialogue import Dialogue
from .errors import DialogueNotFoundError, StateFileError
from .eviction import Evictor
from .openai_api import RequestError

# llama-cpp-python's create_chat_completion / create_completion arguments that are not offered, with the values at
# which they do nothing (accepted, so that code passing its defaults runs); mirostat's tau and
# eta do nothing while mirostat_mode is 0
NOOP_ARGS = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0,
             "logits_processor": None, "stopping_criteria": None, "functions": None, "function_call": None}
MIROSTAT_TUNING = ("mirostat_tau", "mirostat_eta")


class Llama(Context):
    def __init__(self, model_path: str | os.PathLike, *, loopserve: LoopServeConfig | None = None,
                 dialogues_dir: str | os.PathLike | None = None, **kwargs):
        """`kwargs` are llama_cpp.Llama's constructor arguments (n_ctx, n_gpu_layers,
        n_threads, flash_attn, type_k, seed, verbose, ...)."""
        super().__init__(model_path, loopserve=loopserve, **kwargs)
        # the repeat penalty's window, as llama-cpp-python's constructor argument sets it
        self.last_n_tokens_size = int(kwargs.get("last_n_tokens_size", 64))
        self._dialogues_dir = dialogues_dir
        try:
            self.evictor = Evictor(self, self.config)
        except BaseException:
            self.close()
            raise
        self._completions: Completions | None = None

    # -- dialogues ---------------------------------------------------------------------

    def dialogue(self, system: str | None = None, name: str | None = None) -> Dialogue:
        return Dialogue(self, self.evictor, system=system, name=name, dialogues_dir=self._dialogues_dir)

    def dialogues_dir(self) -> Path:
        return paths.dialogues_dir(self._dialogues_dir)

    def dialogue_path(self, name_or_path: str | os.PathLike) -> Path:
        """A path as given, or the default file of a dialogue name."""
        return paths.dialogue_path(name_or_path, self._dialogues_dir)

    def state_mismatch(self, header: dict) -> str | None:
        """Why a state file's KV state (its header) cannot load into this context, or None: the
        K/V types; flash attention, without which llama.cpp keeps V transposed and refuses the
        other layout's state with no word of why (flash_attn_type 0: off, 1: on; -1, auto, is
        resolved when a context starts and left to llama.cpp); more cells than the pool."""
        mine, saved = self.context_settings(), header["context"]
        for key in ("type_k", "type_v"):
            if saved.get(key) != mine[key]:
                return (f"KV cache {key}={saved.get(key)} in the file, {mine[key]} in this context; "
                        f"load it with the same setting")
        fa = saved.get("flash_attn_type")
        if fa in (0, 1) and mine["flash_attn_type"] in (0, 1) and fa != mine["flash_attn_type"]:
            on = ("off", "on")
            return (f"saved with flash attention {on[fa]}, this context has it {on[1 - fa]} (the V cache "
                    f"is laid out otherwise); load it with flash_attn={bool(fa)} (the CLI: "
                    f"--{'' if fa else 'no-'}flash-attn)")
        n = len(header["dialogue"]["positions"])
        if n >= self.n_ctx:
            return f"holds {n} cells, more than this context's n_ctx={self.n_ctx}; load it with a larger n_ctx"
        return None

    def load_dialogue(self, name_or_path: str | os.PathLike) -> Dialogue:
        """Resume a saved dialogue. Every check runs before the live context is touched."""
        path = self.dialogue_path(name_or_path)
        if paths.is_dialogue_name(name_or_path) and not path.exists():
            raise DialogueNotFoundError(f"no saved dialogue {name_or_path!r} (looked for {path})")
        st = state_file.read(path)
        h = st.header
        if h["model"].get("fingerprint") != self.fingerprint:
            raise StateFileError(
                f"{path}: made with another model ({h['model'].get('name', '?')}, fingerprint "
                f"{h['model'].get('fingerprint')}); this model is {self.fingerprint}")
        dlg = Dialogue.from_header(self, self.evictor, h, path, dialogues_dir=self._dialogues_dir)
        why = self.state_mismatch(h)   # after from_header, which checked the header's fields
        if why is not None:
            raise StateFileError(f"{path}: {why}")
        dlg._swapped = st.seq_state
        try:
            self.make_resident(dlg)
        except StateFileError as e:
            raise StateFileError(f"{path}: {e}") from None
        return dlg

    # -- llama-cpp-python's calls --------------------------------------------------------

    def create_chat_completion(self, messages: list[dict], *, temperature: float = 0.2, top_p: float = 0.95,
                               top_k: int = 40, min_p: float = 0.05, max_tokens: int | None = None,
                               stop: str | list[str] | None = None, stream: bool = False, seed: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0,
                               logit_bias: dict | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None, response_format: dict | None = None,
                               tools: list | None = None, tool_choice=None, parallel_tool_calls: bool | None = None,
                               model: str | None = None,
                               stream_options: dict | None = None, grammar=None, loopserve: dict | None = None,
                               reasoning_format: str | None = None, chat_template_kwargs: dict | None = None,
                               **unsupported) -> dict | Iterator[dict]:
        """llama-cpp-python's `create_chat_completion`: OpenAI's response (or, with stream, its
        chunks). Calls that repeat a conversation's messages go on in the dialogue that holds
        them, prefilling only what is new (completions.py); `loopserve`: this call's
        LoopServe settings, as the server's request field. `response_format` ({"type":
        "json_object"}, with llama-cpp-python's "schema" or as {"type": "json_schema", ...}) or
        `grammar` (GBNF text or a llama_cpp.LlamaGrammar) hold the reply to that form (grammar.py);
        `tools` with `tool_choice` "auto" (the default with tools), "required" or a named tool give
        a tool call (the message's tool_calls) or, with "auto", text (tool_calls.py). A reasoning
        model's thinking is the message's `reasoning_content`, its answer the content, unless
        `reasoning_format` is "none" (reasoning.py); `chat_template_kwargs` are the chat template's
        own variables for this call (Qwen3's `enable_thinking`, say), as llama-server's.
        Bad arguments raise `openai_api.RequestError` (a ValueError) naming the parameter, as do
        llama-cpp-python's samplers that are not offered (mirostat, typical_p, tfs_z) unless
        left at values that do nothing. `repeat_penalty` acts over the last `last_n_tokens_size`
        (the constructor's, 64) tokens of the dialogue, as llama-cpp-python's."""
        _refuse("create_chat_completion", unsupported)
        body = dict(messages=messages, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    max_tokens=max_tokens, stop=stop or None, stream=stream, seed=seed,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                    repeat_penalty=repeat_penalty, repeat_last_n=self.last_n_tokens_size,
                    logit_bias=_bias(logit_bias), logprobs=logprobs, top_logprobs=top_logprobs,
                    response_format=response_format, tools=tools, tool_choice=tool_choice,
                    parallel_tool_calls=parallel_tool_calls, model=model,
                    stream_options=stream_options, grammar=_gbnf(grammar), loopserve=loopserve,
                    reasoning_format=reasoning_format, chat_template_kwargs=chat_template_kwargs)
        return self._calls().chat({k: v for k, v in body.items() if v is not None})

    def create_completion(self, prompt: str | list[int], *, max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                          stop: str | list[str] | None = None, stream: bool = False, echo: bool = False,
                          seed: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                          repeat_penalty: float = 1.0,
                          logit_bias: dict | None = None, logprobs: int | None = None, suffix: str | None = None,
                          model: str | None = None, stream_options: dict | None = None, grammar=None,
                          loopserve: dict | None = None, **unsupported) -> dict | Iterator[dict]:
        """llama-cpp-python's `create_completion` (also `llm(prompt, ...)`): the prompt continued
        as text, no chat template; OpenAI's text completion (or, with stream, its chunks). A
        prompt that starts with an earlier call's prompt and completion goes on in that call's
        dialogue (completions.py). `grammar` and errors as create_chat_completion's."""
        _refuse("create_completion", unsupported)
        body = dict(prompt=prompt, max_tokens=max_tokens if max_tokens and max_tokens > 0 else None,
                    temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, stop=stop or None,
                    stream=stream, echo=echo, seed=seed, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty,
                    repeat_last_n=self.last_n_tokens_size, logit_bias=_bias(logit_bias), logprobs=logprobs,
                    suffix=suffix, model=model, stream_options=stream_options, grammar=_gbnf(grammar),
                    loopserve=loopserve)
        return self._calls().text({k: v for k, v in body.items() if v is not None})

    __call__ = create_completion

    def _calls(self) -> Completions:
        if self._completions is None:
            self._completions = Completions(self)
        return self._completions


def _bias(logit_bias: dict | None) -> dict | None:
    """llama-cpp-python's bias maps token ids (ints) to biases; OpenAI's JSON, their strings."""
    return None if logit_bias is None else {str(k): v for k, v in logit_bias.items()}


def _gbnf(grammar) -> str | None:
    """llama-cpp-python's grammar argument (a LlamaGrammar, which keeps its GBNF text) or the
    text itself."""
    return getattr(grammar, "_grammar", grammar)


def _refuse(call: str, unsupported: dict) -> None:
    """llama-cpp-python's arguments that are not offered: refused by name unless they do nothing."""
    for k, v in unsupported.items():
        if k in MIROSTAT_TUNING:
            continue
        if k not in NOOP_ARGS:
            raise TypeError(f"{call}() got an unexpected keyword argument {k!r}")
        if v != NOOP_ARGS[k]:
            raise RequestError(f"{k}={v!r} is not supported (only {NOOP_ARGS[k]!r}, which does nothing); "
                               "sampling offers temperature, top_k, top_p, min_p, repeat_penalty, "
                               "presence_penalty, frequency_penalty, logit_bias and seed", k)
