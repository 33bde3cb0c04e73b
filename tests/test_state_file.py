"""State files: resume without prefill, and every kind of bad file refused cleanly."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_logits

from loopserve_edge import DialogueNotFoundError, StateFileError, state_file

GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture
def saved(tiny_model, make_llm, tmp_path):
    """A two-turn dialogue on tiny_model, saved; returns (llm, live dialogue, path)."""
    llm = make_llm(tiny_model)
    d = llm.dialogue(system="be brief", name="saved")
    d.send("the first message", **GREEDY)
    d.send("the second message", **GREEDY)
    path = d.save(tmp_path / "d.lsd")
    return llm, d, path


def test_loaded_dialogue_continues_exactly_like_the_live_one(saved, tiny_model, make_llm):
    llm, live, path = saved
    other = make_llm(tiny_model)          # another process would see just this
    loaded = other.load_dialogue(path)
    assert loaded.tokens == live.tokens and loaded.messages == live.messages
    assert loaded.n_cells == live.n_cells
    a = live.send("third", **GREEDY)
    b = loaded.send("third", **GREEDY)
    np.testing.assert_array_equal(loaded.first_token_logits, live.first_token_logits)
    assert a == b
    assert loaded.last_stats.reused_tokens == live.last_stats.reused_tokens > 0


def test_state_size_is_what_save_writes(saved, tiny_model, make_llm, tmp_path):
    llm, live, path = saved
    assert live.state_size() == path.stat().st_size
    llm.swap_out(live)                    # swapped out: the size of the bytes it holds
    assert live._seq is None and live.state_size() == live.save(tmp_path / "out.lsd").stat().st_size
    live.send("a third message", **GREEDY)
    assert live.state_size() == live.save(tmp_path / "more.lsd").stat().st_size > path.stat().st_size


def test_named_dialogue_saves_to_the_data_dir(tiny_model, make_llm, isolated_home):
    llm = make_llm(tiny_model)
    d = llm.dialogue(name="notes")
    d.send("remember this", **GREEDY)
    path = d.save()
    assert path == isolated_home / "dialogues" / "notes.lsd"
    again = llm.load_dialogue("notes")
    assert again.messages == d.messages
    with pytest.raises(DialogueNotFoundError, match="no saved dialogue 'nope'"):
        llm.load_dialogue("nope")


def _assert_refused(llm, path, match):
    resident_before = dict(llm._resident)
    with pytest.raises(StateFileError, match=match) as e:
        llm.load_dialogue(path)
    assert str(path) in str(e.value)
    assert llm._resident == resident_before


def _corruptions(data: bytes):
    n = len(data)
    yield "truncated", data[: n // 2], "too short|checksum|length"
    yield "truncated-by-one", data[:-1], "checksum"
    yield "empty", b"", "too short"
    for where in (10, 40, n // 2, n - 40, n - 1):
        flipped = bytearray(data)
        flipped[where] ^= 0x01
        yield f"flip@{where}", bytes(flipped), "checksum|magic|version"
    yield "magic", b"NOTMAGIC" + data[8:], "wrong magic"
    yield "gguf", b"GGUF" + bytes(100), "wrong magic"


def test_bad_files_raise_and_touch_nothing(saved, tmp_path):
    llm, live, path = saved
    good = path.read_bytes()
    expected = live.send("probe", **GREEDY)
    live_tokens = list(live.tokens)
    for name, data, match in _corruptions(good):
        bad = tmp_path / f"{name}.lsd"
        bad.write_bytes(data)
        _assert_refused(llm, bad, match)
    assert path.read_bytes() == good
    assert live.tokens == live_tokens
    # the live dialogue still answers as before the attempts
    replay = llm.load_dialogue(path)
    assert replay.send("probe", **GREEDY) == expected


def test_future_format_version_is_refused(saved, tmp_path):
    llm, _, path = saved
    st = state_file.read(path)
    body = bytearray(state_file.encode(st)[:-32])
    body[8:12] = (state_file.VERSION + 1).to_bytes(4, "little")
    bad = tmp_path / "v3.lsd"
    bad.write_bytes(bytes(body) + hashlib.sha256(body).digest())
    _assert_refused(llm, bad, f"format version {state_file.VERSION + 1}")


def test_a_version_1_file_is_read_as_before(saved, tmp_path):
    """Version 2 added the cells' layout; a version 1 file (no layout: cell-wise) loads as it did."""
    import json

    llm, d, path = saved
    st = state_file.read(path)
    assert state_file.VERSION == 3 and st.header["dialogue"]["layout"] == "cell"
    del st.header["dialogue"]["layout"]
    header = json.dumps(st.header).encode()
    body = (state_file._HEAD.pack(state_file.MAGIC, 1, len(header)) + header
            + state_file._LEN.pack(len(st.seq_state)) + st.seq_state)
    old = tmp_path / "v1.lsd"
    old.write_bytes(body + hashlib.sha256(body).digest())
    e = llm.load_dialogue(old)
    assert (e.tokens, e.positions, e.layout) == (d.tokens, d.positions, "cell")


def test_a_file_without_hidden_rows_stays_version_2(saved):
    """Version 3 is only for dialogues with hidden rows (allocation): an older loopserve-edge
    still reads every other file."""
    _, _, path = saved
    assert int.from_bytes(path.read_bytes()[8:12], "little") == 2


def test_file_of_another_model_is_refused(saved, other_tiny_model, make_llm):
    _, _, path = saved
    other = make_llm(other_tiny_model)
    _assert_refused(other, path, "made with another model")


def test_other_kv_cache_type_is_refused(saved, tiny_model, make_llm):
    _, _, path = saved
    q8 = make_llm(tiny_model, type_k=8, type_v=8, flash_attn=True)  # GGML_TYPE_Q8_0
    _assert_refused(q8, path, "type_k")


def test_other_flash_attention_setting_is_refused(saved, tiny_model, make_llm, tmp_path):
    """Without flash attention llama.cpp keeps V transposed: a state of the other layout was
    refused inside llama.cpp ("rejected the sequence state"), with no word of the setting."""
    _, _, path = saved                                      # flash attention off
    on = make_llm(tiny_model, flash_attn=True)
    live = on.dialogue()
    live.send("kept", **GREEDY)
    _assert_refused(on, path, "saved with flash attention off, this context has it on")
    assert live.send("still here", **GREEDY) is not None and live.turns == 2   # nothing lost
    made_on = live.save(tmp_path / "on.lsd")
    _assert_refused(make_llm(tiny_model), made_on, r"flash attention on, this context has it off.*--flash-attn")
    assert make_llm(tiny_model, flash_attn=True).load_dialogue(made_on).tokens == live.tokens


def test_a_dialogue_larger_than_the_pool_is_refused(tiny_model, make_llm, tmp_path):
    big = make_llm(tiny_model, n_ctx=512).dialogue()
    big.send("x" * 300, **GREEDY)
    assert 256 < big.n_cells < 512
    path = big.save(tmp_path / "big.lsd")
    _assert_refused(make_llm(tiny_model, n_ctx=256), path, "more than this context's n_ctx=256; load it with a larger")


def test_missing_file(tiny_model, make_llm, tmp_path):
    llm = make_llm(tiny_model)
    _assert_refused(llm, tmp_path / "absent.lsd", "no such state file")


KILLED_SAVE = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
from loopserve_edge import Llama
llm = Llama({model!r}, n_ctx=512, n_threads=1)
d = llm.dialogue()
d.send("one", temperature=0, max_tokens=8)
d.save({path!r})
print("first-save-done", flush=True)
d.send("two", temperature=0, max_tokens=8)
real = getattr(os, {hook!r})
def stall(*a, **k):
    print("stalled", flush=True)
    time.sleep(60)
setattr(os, {hook!r}, stall)
d.save({path!r})
"""


@pytest.mark.parametrize("hook", ["fsync", "replace"])
def test_save_killed_midway_keeps_the_previous_file(tiny_model, make_llm, tmp_path, hook):
    path = tmp_path / "killed.lsd"
    code = KILLED_SAVE.format(tests=str(Path(__file__).parent), model=str(tiny_model),
                              path=str(path), hook=hook)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line.strip())
        if line.strip() == "stalled" or not line:
            break
    assert lines[-2:] == ["first-save-done", "stalled"], lines
    first = path.read_bytes()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == first
    llm = make_llm(tiny_model)
    d = llm.load_dialogue(path)
    assert d.turns == 1
    # the half-written temporary file is not mistaken for a dialogue
    assert [p.name for p in tmp_path.glob("*.lsd")] == ["killed.lsd"]


@pytest.mark.parametrize("resident_after", [1, 3])
def test_state_loads_whatever_the_number_of_resident_dialogues(tiny_model, make_llm, tmp_path,
                                                                 resident_after):
    from loopserve_edge import LoopServeConfig

    llm = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=2))
    llm.dialogue().send("keeps sequence 0 busy", **GREEDY)
    d = llm.dialogue()                      # so this one lives in sequence 1
    d.send("a message", **GREEDY)
    assert d._seq == 1
    path = d.save(tmp_path / "s1.lsd")
    other = make_llm(tiny_model, loopserve=LoopServeConfig(max_resident=resident_after))
    loaded = other.load_dialogue(path)
    assert loaded.n_cells == d.n_cells
    assert loaded.send("next", **GREEDY) == d.send("next", **GREEDY)
    assert_same_logits(loaded.first_token_logits, d.first_token_logits)


def test_a_killed_save_leaves_a_temporary_that_only_its_dead_process_loses(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead, alive = int(gone.stdout), os.getpid()
    (tmp_path / "d.lsd").write_bytes(b"the previous state")
    (tmp_path / f".d.lsd.{dead}.tmp").write_bytes(b"half a save")
    (tmp_path / f".e.lsd.{alive}.tmp").write_bytes(b"a save going on")
    (tmp_path / ".notes.txt.1.tmp").write_bytes(b"not ours")
    assert state_file.remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".e.lsd.{alive}.tmp", ".notes.txt.1.tmp", "d.lsd"]
    assert (tmp_path / "d.lsd").read_bytes() == b"the previous state"
    assert state_file.remove_stale_temporaries(tmp_path / "missing") == 0
