"""The loopserve-edge command, end to end, on the real default model."""
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopserve_edge import LoopServeConfig, state_file
from loopserve_edge.model_file import gguf_extent

CLI = [sys.executable, "-m", "loopserve_edge.cli"]
FAST = ["--temperature", "0", "--max-tokens", "24", "--threads", "2", "--n-ctx", "2048"]


def run(args, stdin="", home=None, timeout=300):
    env = dict(os.environ)
    if home is not None:
        env["LOOPSERVE_EDGE_HOME"] = str(home)
    return subprocess.run(CLI + args, input=stdin, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_scripted_chat_resumes_in_a_new_process_like_in_process(default_model, tmp_path):
    turns = ["My name is Ada.", "What is my name?", "Say it once more."]
    one = run(["chat", "--dialogue", "t1", *FAST], "\n".join(turns) + "\n", home=tmp_path / "a")
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() and "Traceback" not in one.stderr

    first = run(["chat", "--dialogue", "t1", *FAST], "\n".join(turns[:2]) + "\n", home=tmp_path / "b")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "b/dialogues/t1.lsd").is_file()
    second = run(["chat", "--dialogue", "t1", *FAST], turns[2] + "\n", home=tmp_path / "b")
    assert second.returncode == 0, second.stderr
    assert first.stdout + second.stdout == one.stdout

    listing = run(["dialogues"], home=tmp_path / "b")
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if line.startswith("t1 "))
    assert "SmolLM2-135M-Instruct" in row and " 3 " in row


def test_a_resumed_dialogue_goes_on_with_its_own_settings(default_model, tmp_path):
    """Options left out take the saved dialogue's values. Resumed with the defaults, a head-wise
    budgeted dialogue (flash attention on) failed in llama.cpp's state read, and a budget was
    dropped; an option given still wins."""
    turns = ["My name is Ada.", "What is my name?", "Say it once more."]
    made = ["--kv-budget", "96", "--granularity", "head"]
    one = run(["chat", "--dialogue", "h", *FAST, *made], "\n".join(turns) + "\n", home=tmp_path / "a")
    first = run(["chat", "--dialogue", "h", *FAST, *made], "\n".join(turns[:2]) + "\n", home=tmp_path / "b")
    second = run(["chat", "--dialogue", "h", *FAST], turns[2] + "\n", home=tmp_path / "b")
    assert one.returncode == first.returncode == second.returncode == 0, second.stderr
    assert first.stdout + second.stdout == one.stdout
    path = tmp_path / "b/dialogues/h.lsd"
    h = state_file.read_header(path)
    assert h["dialogue"]["layout"] == "head" and h["context"]["flash_attn_type"] == 1
    assert (h["loopserve"]["policy"], h["loopserve"]["budget"], h["loopserve"]["granularity"]) == ("loopserve", 96, "head")

    more = run(["chat", "--dialogue", "h", *FAST, "--kv-budget", "128"], "And again.\n", home=tmp_path / "b")
    assert more.returncode == 0, more.stderr
    c = state_file.read_header(path)["loopserve"]
    assert (c["budget"], c["interval"], c["granularity"]) == (128, LoopServeConfig(budget=128).interval, "head")

    # head-wise asked of a dialogue saved without flash attention: one line saying so, not llama.cpp's refusal
    assert run(["chat", "--dialogue", "c", *FAST], "hi\n", home=tmp_path / "b").returncode == 0
    r = run(["chat", "--dialogue", "c", *FAST, "--granularity", "head"], "hi\n", home=tmp_path / "b")
    assert r.returncode == 2 and "saved with flash attention off" in r.stderr and not r.stdout
    r = run(["chat", "--dialogue", "h", *FAST, "--no-flash-attn"], "hi\n", home=tmp_path / "b")
    assert r.returncode == 1 and "granularity='head' cannot run with flash attention off" in r.stderr
    r = run(["chat", "--dialogue", "h", *FAST, "--no-flash-attn", "--granularity", "cell"], "hi\n", home=tmp_path / "b")
    assert r.returncode == 1 and "saved with flash attention on" in r.stderr and "--flash-attn" in r.stderr
    assert state_file.read_header(path)["dialogue"]["turns"] == 4       # nothing lost
    listing = run(["dialogues"], home=tmp_path / "b").stdout.splitlines()
    assert " KV " in listing[0]
    assert " loopserve 128 head " in next(x for x in listing if x.startswith("h "))
    assert " full " in next(x for x in listing if x.startswith("c "))


def test_min_p_of_one_samples_the_greedy_reply(default_model, tmp_path):
    # min-p 1 leaves only the most likely token, whatever the temperature and seed
    args = ["chat", "--max-tokens", "24", "--threads", "2", "--n-ctx", "2048"]
    greedy = run([*args, "--temperature", "0"], "Name three fruits.\n", home=tmp_path)
    hot = run([*args, "--temperature", "2", "--seed", "5", "--min-p", "1"], "Name three fruits.\n", home=tmp_path)
    wild = run([*args, "--temperature", "2", "--seed", "5"], "Name three fruits.\n", home=tmp_path)
    assert greedy.returncode == hot.returncode == wild.returncode == 0, hot.stderr
    assert hot.stdout == greedy.stdout != wild.stdout


def test_replies_held_to_a_json_schema_or_a_grammar(default_model, tmp_path):
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "string"}},
                                  "required": ["answer"]}))
    r = run(["chat", *FAST, "--max-tokens", "64", "--json-schema", str(schema)], "What is 2+2?\nAnd 3+3?\n",
            home=tmp_path)
    assert r.returncode == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 2 and all(set(json.loads(x)) == {"answer"} for x in replies)
    gbnf = tmp_path / "yn.gbnf"
    gbnf.write_text('root ::= "yes" | "no"\n')
    r = run(["chat", *FAST, "--grammar", str(gbnf)], "Is the sky blue?\n", home=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no"), r.stderr
    # bad forms stop before any turn, in one line
    gbnf.write_text("root ::= undefined\n")
    for args, why in [(["--json", "--grammar", str(gbnf)], "give one of"), (["--grammar", str(gbnf)], "does not parse"),
                      (["--json-schema", str(gbnf)], "Expecting value")]:
        r = run(["chat", *FAST, *args], "hi\n", home=tmp_path)
        assert r.returncode != 0 and why in r.stderr and not r.stdout and "Traceback" not in r.stderr


def test_in_chat_commands(default_model, tmp_path):
    script = "Hello!\n/stats\n/save " + str(tmp_path / "x.lsd") + "\n/reset\n/stats\n/help\n/quit\nnever sent\n"
    r = run(["chat", *FAST], script, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 1
    assert "turn 1: prompt" in r.stderr and "reused" in r.stderr and "KV " in r.stderr
    assert "evicted so far" in r.stderr and "tok scored" in r.stderr
    assert "no turn yet" in r.stderr and "/load path" in r.stderr
    assert (tmp_path / "x.lsd").is_file()
    assert "the dialogue holds 0 turns, KV 0/" in r.stderr    # after /reset
    loaded = run(["chat", *FAST], f"/load {tmp_path / 'x.lsd'}\n/stats\n", home=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded" in loaded.stderr and "1 turns" in loaded.stderr
    # /stats before a turn of this session says what the loaded dialogue holds
    held = re.search(r"the dialogue holds 1 turns, KV (\d+)/", loaded.stderr)
    assert held and int(held.group(1)) > 0, loaded.stderr


def _one_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_bad_model_paths(tmp_path, tiny_model):
    assert "no such model file" in _one_error_line(run(["chat", str(tmp_path / "none.gguf")], ""))
    notgguf = tmp_path / "notes.gguf"
    notgguf.write_text("hello")
    assert "not a GGUF model file" in _one_error_line(run(["chat", str(notgguf)], ""))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))
    assert "could not load" in _one_error_line(run(["chat", str(broken)], ""))
    # a download cut short: the header's tensor extents say so
    data = tiny_model.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 3 // 4])
    line = _one_error_line(run(["chat", str(cut)], ""))
    assert f"truncated ({len(data) * 3 // 4:,} bytes; its header lists tensors up to byte {len(data):,})" in line
    cut.write_bytes(data[:40])
    assert "ending inside its header" in _one_error_line(run(["chat", str(cut)], ""))


def test_a_whole_gguf_files_tensor_extent_is_its_size(tiny_model, default_model):
    # F32 tensors, and the default model's Q4_1, Q8_0 and F32: the type sizes the check reads
    for whole in (tiny_model, default_model):
        assert gguf_extent(whole) == whole.stat().st_size


def test_corrupt_or_unknown_dialogue(default_model, tmp_path):
    home = tmp_path / "home"
    (home / "dialogues").mkdir(parents=True)
    (home / "dialogues/bad.lsd").write_bytes(b"LSEDGE\x00\x01" + bytes(60))
    line = _one_error_line(run(["chat", "--dialogue", "bad", *FAST], "hi\n", home=home))
    assert "bad.lsd" in line and ("checksum" in line or "short" in line)
    line = _one_error_line(run(["chat", *FAST], "/load ghost\n", home=home))
    assert "no saved dialogue 'ghost'" in line
    listing = run(["dialogues"], home=home)
    assert listing.returncode == 0 and "unreadable" in listing.stdout


def test_context_overflow_is_reported(default_model, tmp_path):
    r = run(["chat", "--n-ctx", "256", "--temperature", "0", "--max-tokens", "4"],
            "word " * 400 + "\n", home=tmp_path)
    assert "n_ctx=256" in _one_error_line(r)


def test_a_budget_alone_compresses_and_full_with_a_budget_is_refused(default_model, tmp_path):
    # before, --kv-budget without --policy kept policy full: the budget did nothing and this
    # input, longer than n_ctx, was refused
    stdin = "word " * 400 + "\n/stats\n"
    r = run(["chat", "--kv-budget", "256", "--n-ctx", "512", "--temperature", "0", "--max-tokens", "4",
             "--threads", "2"], stdin, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "KV 256/512 cells" in r.stderr and "evicted so far" in r.stderr   # /stats
    r = run(["chat", "--policy", "full", "--kv-budget", "256"], stdin="hi\n", timeout=60)
    assert r.returncode == 2 and "takes no budget" in r.stderr and "Traceback" not in r.stderr
    # a budget the context has no room beside: refused at the start, not at the first long input
    r = run(["chat", "--kv-budget", "4096", "--n-ctx", "2048", "--threads", "2"], stdin="hi\n", timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "n_ctx=2048 leaves no cells for new input beside the KV budget of 4096" in _one_error_line(r)


def test_a_model_without_a_chat_template_chats_in_the_completion_format(tmp_path):
    from loopserve_edge.random_gguf import write_random_llama

    base = write_random_llama(tmp_path / "base.gguf", seed=0, chat_template=None)  # as a base model's GGUF
    line = [x for x in run(["info", str(base)]).stdout.splitlines() if x.startswith("model.chat_template")]
    assert line == ["model.chat_template: no (chat and serve use the completion format; with --format chat, "
                    "ChatML's turns)"]
    args = ["chat", str(base), "--dialogue", "t", "--temperature", "0", "--max-tokens", "40", "--threads", "2"]
    for fmt in ("auto", "chat"):
        r = run(args + ["--format", fmt, "--dialogues-dir", str(tmp_path / fmt)], "Q?\n")
        assert r.returncode == 0, r.stderr
    formats = {fmt: state_file.read(tmp_path / fmt / "t.lsd").header["context"]["prompt_format"]
               for fmt in ("auto", "chat")}
    assert formats == {"auto": "completion", "chat": "chat"}


class TerminalChat:
    """`chat` on a pseudo-terminal, as a person runs it (stdin a tty: the interactive chat)."""

    def __init__(self, home: Path, *args: str):
        try:
            self.master, slave = pty.openpty()
        except OSError as e:   # a container without /dev/ptmx
            pytest.skip(f"no pseudo-terminal here ({e})")
        self.proc = subprocess.Popen(CLI + ["chat", *args], stdin=slave, stdout=slave, stderr=slave,
                                     env=dict(os.environ, LOOPSERVE_EDGE_HOME=str(home)), close_fds=True)
        os.close(slave)
        self.seen = b""

    def read(self) -> None:
        assert self.proc.poll() is None, self.seen.decode(errors="replace")
        if select.select([self.master], [], [], 0.5)[0]:
            self.seen += os.read(self.master, 4096)

    def read_until(self, marker: bytes, count: int = 1, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while self.seen.count(marker) < count:
            assert time.time() < deadline, self.seen.decode(errors="replace")
            self.read()

    def send(self, text: bytes) -> None:
        os.write(self.master, text)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(default_model, tmp_path):
    # a terminal chat: Ctrl-C during a reply ends that reply where it is, the words so far kept as
    # the turn's reply, and the next prompt comes; before, it ended the program
    chat = TerminalChat(tmp_path, "--dialogue", "story", "--temperature", "0", "--max-tokens", "2000",
                        "--threads", "2", "--n-ctx", "4096")
    try:
        chat.read_until(b"you> ")
        chat.send(b"Write a very long story about a dragon who learns to cook.\n")
        chat.read_until(b"bot> ")
        start, deadline = len(chat.seen), time.time() + 120
        while len(chat.seen) - start < 80:       # the reply is streaming (greedy: a long story)
            chat.read()
            assert time.time() < deadline and b"you> " not in chat.seen[start:]
        chat.proc.send_signal(signal.SIGINT)
        chat.read_until(b"[stopped]")
        chat.read_until(b"you> ", 2, 60)
        chat.send(b"/quit\n")
        assert chat.proc.wait(timeout=60) == 0, chat.seen.decode(errors="replace")
    finally:
        chat.close()
    saved = state_file.read(tmp_path / "dialogues" / "story.lsd").header["dialogue"]
    reply = saved["messages"][-1]
    assert reply["role"] == "assistant" and len(reply["content"]) > 40          # what it said before Ctrl-C
    assert saved["turns"] == 1 and reply["content"][:40] in chat.seen.decode(errors="replace")


def test_ctrl_c_during_a_long_prefill_drops_the_message(default_model, tmp_path):
    args = ["--temperature", "0", "--max-tokens", "16", "--threads", "2", "--n-ctx", "4096"]
    chat = TerminalChat(tmp_path, "--dialogue", "d", *args)
    try:
        chat.read_until(b"you> ")
        chat.send(b"Hello.\n")
        chat.read_until(b"you> ", 2)
        # ~3000 tokens, seconds of prefill on 2 threads, in lines under a terminal's line limit
        # (4095 characters; a longer line is cut there) as a block
        chat.send(b'"""\n' + ("word " * 150 + "\n").encode() * 20 + b'"""\n')
        chat.read_until(b"bot> ", 2)
        time.sleep(1)
        chat.proc.send_signal(signal.SIGINT)
        chat.read_until(b"[interrupted: the message was not sent]")
        chat.read_until(b"you> ", 3)
        chat.send(b"What did I say?\n")
        chat.read_until(b"you> ", 4)
        chat.send(b"/quit\n")
        assert chat.proc.wait(timeout=60) == 0, chat.seen.decode(errors="replace")
    finally:
        chat.close()
    reply = chat.seen.decode(errors="replace").replace("\r", "").split("bot> ")[-1].split("\nyou> ")[0]
    # the same dialogue goes on as if the long message had never come: its reply is the one a
    # dialogue that never saw it gives (cells of the interrupted input left behind would change it)
    twin = run(["chat", *args], "Hello.\nWhat did I say?\n", home=tmp_path / "twin")
    assert twin.returncode == 0 and reply.strip() == twin.stdout.splitlines()[-1].strip()
    saved = state_file.read(tmp_path / "dialogues" / "d.lsd").header["dialogue"]
    assert saved["turns"] == 2 and [m["content"] for m in saved["messages"][::2]] == ["Hello.", "What did I say?"]


def test_blocks_of_lines_and_files_are_one_message(default_model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Notes.\nThe secret number is 4417.\n")
    stdin = ('"""\nLine one.\n/stats is a word here\n"""\n'     # a block: one message, never a command
             '"""One line."""\n'
             f"/file {doc}\nWhat is the secret number?\n")
    r = run(["chat", "--dialogue", "b", "--temperature", "0", "--max-tokens", "8", "--threads", "2"], stdin,
            home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "doc.txt: 33 characters, sent before your next message" in r.stderr
    saved = state_file.read(tmp_path / "dialogues" / "b.lsd").header["dialogue"]
    users = [m["content"] for m in saved["messages"][::2]]
    assert users == ["Line one.\n/stats is a word here", "One line.",
                     "Notes.\nThe secret number is 4417.\n\nWhat is the secret number?"]
    for arg, why in ((str(tmp_path / "missing.txt"), "no such file"), (str(tmp_path), "a directory"), ("", "needs")):
        line = _one_error_line(run(["chat", "--temperature", "0", "--max-tokens", "4"], f"/file {arg}\nhi\n",
                                   home=tmp_path / "e"))
        assert why in line


def test_info_reports_model_and_runtime(default_model):
    r = run(["info"])
    assert r.returncode == 0, r.stderr
    assert "runtime.patch_hash:" in r.stdout and "runtime.backend: C" in r.stdout
    assert "model.architecture: llama" in r.stdout and "model.params: 134,515,008" in r.stdout


def test_console_script_is_installed():
    exe = shutil.which("loopserve-edge", path=str(Path(sys.executable).parent))
    assert exe, "setup installs the loopserve-edge command into the environment"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "chat" in r.stdout and "dialogues" in r.stdout


@pytest.mark.parametrize("args,why", [(["--kv-type", "q8_0"], "needs flash attention"),
                                      (["--granularity", "head"], "flash attention off")])
def test_serve_refuses_settings_that_need_flash_attention_without_it(default_model, args, why):
    r = run(["serve", "--no-flash-attn", *args, "--port", "0"], timeout=60)
    assert r.returncode == 1 and why in r.stderr and "Traceback" not in r.stderr


def test_an_allocation_without_head_granularity_is_a_usage_error():
    r = run(["chat", "--policy", "snapkv", "--kv-budget", "256", "--kv-allocation", "ada"], stdin="hi\n", timeout=60)
    assert r.returncode == 2 and "granularity='head'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,why", [(["--kv-span", "0"], "--kv-span"),
                                      (["--granularity", "head", "--kv-allocation", "ada", "--kv-span", "8"],
                                       "allocation='uniform'")])
def test_spans_that_cannot_be_kept_are_usage_errors(args, why):
    r = run(["chat", "--policy", "loopserve", "--kv-budget", "256", *args], stdin="hi\n", timeout=60)
    assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr


def test_a_dialogue_name_the_file_system_refuses_is_one_error_line(default_model, tmp_path):
    """An OSError (here a name longer than a file name may be) was a traceback."""
    r = run(["chat", "--dialogue", "x" * 300, *FAST], "hi\n", home=tmp_path)
    assert "File name too long" in _one_error_line(r) and r.returncode == 1
    r = run(["chat", *FAST], "hi\n/save " + "y" * 300 + "\n", home=tmp_path)
    assert "File name too long" in r.stderr and "Traceback" not in r.stderr and r.returncode == 1


def test_max_tokens_minus_one_is_no_limit(default_model, tmp_path):
    """llama.cpp's -n -1: the reply goes on to the end of the context (an empty reply before)."""
    r = run(["chat", "--max-tokens", "-1", "--n-ctx", "256", "--temperature", "0", "--threads", "2"],
            "Write a long story about a cat.\n/stats\n", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "the context is full" in r.stderr and len(r.stdout.split()) > 100
    r = run(["chat", "--max-tokens", "-2"], "hi\n", home=tmp_path)
    assert r.returncode == 2 and "-2 is not in the range x>=-1" in r.stderr
