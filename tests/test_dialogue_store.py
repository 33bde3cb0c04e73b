"""The server's dialogues (dialogue_store.py) while a request runs in one of them."""
from conftest import step_reply

from loopserve_edge import LoopServeConfig
from loopserve_edge.dialogue_store import DialogueStore

GREEDY = dict(temperature=0, max_tokens=10)


def test_a_dialogue_answering_a_request_stays_in_ram_and_unsaved_until_its_turn_ends(tiny_model, make_llm,
                                                                                     tmp_path):
    """One resident dialogue and no RAM for swapped-out ones: another request prefilled while a
    reply is in progress swaps that dialogue out, and the RAM limit then moved it to disk,
    closing the Dialogue the reply went on in (a server with --ram-limit-mb 0 answered 500:
    "attention scores do not cover the dialogue's cells"); an idle save could write it between a
    token's decode and its logits. Both wait for its turn's end now."""
    llm = make_llm(tiny_model, n_ctx=512, loopserve=LoopServeConfig(max_resident=1))
    store = DialogueStore(llm, tmp_path, ram_limit=0)
    ev = store.evictor({})
    a, da = store.for_request(None, [], "x" * 40, "a", ev)
    first = da.send("x" * 40, **GREEDY)
    store.updated(a)
    history = list(da.messages)
    a, da = store.for_request(None, history, "y" * 30, "a", ev)
    a.busy = True   # as the server's engine marks it

    ran = []

    def another_request(k):
        if k == 2:
            ran.append(k)
            b, db = store.for_request(None, [], "z" * 30, "b", ev)   # swaps a out
            db.send("z" * 30, **GREEDY)
            store.updated(b)          # over the RAM limit of 0 bytes
            assert a.dialogue is da and da._swapped is not None
            assert store.save() == 1  # b's file, not a's
            assert not (tmp_path / "a.lsd").exists()

    step_reply(llm, da, da.send_steps("y" * 30, **GREEDY), between=another_request)
    assert ran and da.last_stats.decode_tokens > 2
    a.busy = False
    store.updated(a)
    assert store.save() == 1 and (tmp_path / "a.lsd").exists()
    twin = make_llm(tiny_model, n_ctx=512, loopserve=LoopServeConfig(max_resident=1)).dialogue()
    assert twin.send("x" * 40, **GREEDY) == first
    assert twin.send("y" * 30, **GREEDY) == da.messages[-1]["content"]
    assert twin.tokens == da.tokens


def test_files_this_context_cannot_take_are_left_out_of_the_index_and_kept(tiny_model, make_llm, tmp_path):
    """A server restarted with a smaller pool, other K/V types or flash attention switched: its
    files are not indexed (a request then prefills the conversation afresh) and stay as they
    were, for a restart with their settings."""
    store = DialogueStore(make_llm(tiny_model, n_ctx=512), tmp_path, ram_limit=1 << 30)
    e, d = store.for_request(None, [], "x" * 300, None, store.evictor({}))
    d.send("x" * 300, **GREEDY)
    store.updated(e)
    assert store.save() == 1
    (path,) = tmp_path.glob("*.lsd")
    data = path.read_bytes()
    assert 256 < len(d.positions) < 512
    for kw in (dict(n_ctx=256), dict(n_ctx=512, flash_attn=True), dict(n_ctx=512, type_k=8, flash_attn=True)):
        assert DialogueStore(make_llm(tiny_model, **kw), tmp_path, ram_limit=1 << 30).restore() == 0, kw
    assert path.read_bytes() == data
    assert DialogueStore(make_llm(tiny_model, n_ctx=512), tmp_path, ram_limit=1 << 30).restore() == 1
