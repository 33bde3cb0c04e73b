"""The multi-turn benchmark: task generators, scorers, fidelity, methods, and the harness
end to end (the default model on CPU, through the CLI)."""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import loopserve_edge  # noqa: F401  (before numpy: see conftest.py)
import numpy as np
import pytest

from loopserve_edge.bench import fidelity, scoring
from loopserve_edge.bench.dialogues import ACK, Block, Question, Tokens, layout
from loopserve_edge.bench.methods import METHODS, Run, expand
from loopserve_edge.bench.tasks import FAMILIES, TASKS, generate

CLI = [sys.executable, "-m", "loopserve_edge.cli", "bench"]


@pytest.fixture(scope="module")
def tokens(default_model):
    from loopserve_edge import Llama, LoopServeConfig

    llm = Llama(default_model, n_ctx=256, n_threads=2, loopserve=LoopServeConfig(max_resident=1))
    yield Tokens(llm)
    llm.close()


def text_before(case, turn_index):
    """Everything the user has said up to and including a turn."""
    return "\n\n".join(t.user for t in case.turns[:turn_index + 1])


# -- generators ---------------------------------------------------------------------------

def resolve_var(text, name):
    assigns = dict(re.findall(r"VAR (\w+) = ((?:VAR )?\w+)\.", text))
    value = assigns[name]
    while value.startswith("VAR "):
        value = assigns[value[4:]]
    return value


def check_answer_in_context(case, i, turn):
    """The reference answer of a scored turn really follows from what was said."""
    seen = text_before(case, i)
    task = case.task
    if task == "package_docs":   # no reference answer: what the question names is in the text
        k = [j for j, t in enumerate(case.turns) if t.scorer].index(i)
        q = case.meta["questions"][k]
        assert f"file {q['file']}" in turn.user and f"File: {q['file']}\n" in seen and q["name"] in seen
        return
    if task == "open_generation":
        k = re.search(r"Document \[(\d+)\]", turn.user).group(1)
        assert f"Document [{k}] (Title:" in seen
        return
    (answer,) = turn.answers[:1]
    if task == "aggregation":
        log = re.findall(r"Entry \d+: a visitor brought a (\w+)\.", seen)
        counts = Counter(log)
        if turn.scorer == "choice":
            (top, n), (_, n2) = counts.most_common(2)
            assert answer == top and n > n2 and set(turn.choices) >= set(counts)
        else:
            item = re.search(r"brought a (\w+)\?", turn.user).group(1)
            assert int(answer) == counts[item]
    elif task == "variable_tracking":
        name = re.search(r"value of VAR (\w+)\?", turn.user).group(1)
        assert resolve_var(seen, name) == answer
        # one hop: the reply starts as the statement does, which the model completes by copying
        if case.meta["knobs"]["hops"] == 1:
            assert turn.cue == f"VAR {name} =" and f"{turn.cue} {answer}." in seen
        else:
            assert turn.cue == f"The value of VAR {name} is" and f"VAR {name} = VAR " in seen
    elif task == "state_tracking":
        attr = re.search(r"What is my (.+?) now\?", turn.user).group(1)
        values = re.findall(rf"my {attr} is (?:now )?(\d+)\.", seen)
        assert values and values[-1] == answer
    elif task == "chained":
        named = re.search(r"does agent (\w+) report", turn.user)   # the first turn, or explicit
        subject = named.group(1) if named else case.turns[i - 1].answers[0]
        if i > next(k for k, t in enumerate(case.turns) if t.scorer):
            assert subject == case.turns[i - 1].answers[0]       # the chain goes on from the last answer
        assert f"Agent {subject} reports to agent {answer}." in seen
        assert answer in turn.choices and subject not in turn.choices
    elif task == "kv_retrieval":
        key = re.search(r'key "([0-9a-f-]+)"', turn.user).group(1)
        assert f'"{key}": "{answer}"' in seen
    elif task == "passkey":
        assert f"The pass key is {answer}." in seen
    elif task == "multi_needle":
        city = re.search(r"number for (\w+)\?", turn.user).group(1)
        assert f"The special magic number for {city} is {answer}." in seen
    else:  # NQ question answering: the gold passage is in the context
        assert any(a in seen for a in turn.answers), (turn.user[-200:], turn.answers)


@pytest.mark.parametrize("task", TASKS)
def test_generator_answers_are_in_the_context_and_fit_the_length(task, tokens):
    """At every difficulty level of the family, in both prompt formats."""
    levels = FAMILIES[task].ladder or ({},)
    for ctx, turns, level, fmt in [(1024, 2, lv, "chat") for lv in levels] + [(4096, 3, levels[0], "chat"),
                                                                           (1024, 2, levels[-1], "completion")]:
        case = generate(task, ctx=ctx, turns=turns, seed=0, index=0, tokens=tokens, levels=level, fmt=fmt)
        scored = [(i, t) for i, t in enumerate(case.turns) if t.scorer]
        assert len(scored) == turns
        for i, t in scored:
            check_answer_in_context(case, i, t)
        n = tokens.dialogue(case.system, case.turns)
        assert 0.9 * ctx <= n <= ctx, (task, ctx, level, n)
        assert case.meta["tokens"] == n and case.meta["knobs"] == dict(levels[0], **level)


def test_difficulty_levels_change_what_they_say(tokens):
    def gen(task, **level):
        return generate(task, ctx=2048, turns=2, seed=0, index=0, tokens=tokens, levels=level)

    kv = gen("kv_retrieval", records=3)
    assert kv.meta["records"] == 3 and kv.turns[0].user.count('": "') == 3
    assert gen("kv_retrieval").meta["records"] > 20          # the object fills the context
    assert gen("multi_needle", extra=0).turns[0].user.count("The special magic number for") == 2 + 0
    assert gen("multi_needle").turns[0].user.count("The special magic number for") == 2 + 2
    two = gen("nq_qa", docs=2)
    assert two.meta["n_docs"] == 2 and len(two.turns[0].user) > 3000   # the rest is filler
    assert gen("nq_qa").meta["n_docs"] > 8
    assert "VAR" in gen("variable_tracking", hops=1).turns[0].user
    with pytest.raises(ValueError, match="no difficulty setting 'hops'"):
        gen("passkey", hops=1)


def test_completion_format_puts_worked_examples_first(tokens):
    case = generate("passkey", ctx=1024, turns=2, seed=0, index=0, tokens=tokens, fmt="completion")
    chat = generate("passkey", ctx=1024, turns=2, seed=0, index=0, tokens=tokens, fmt="chat")
    # a worked question and an acknowledgement, with nothing the questions ask about
    assert case.system.count("\nAnswer: ") == 2 and "pass key" not in case.system
    assert chat.system == "You answer questions about the text the user gives you. Answer briefly."
    assert case.digest() != chat.digest() and case.meta["format"] == "completion"
    asked = [t for t in case.turns if t.scorer]
    # each question's reply starts with its answer cue, which the model completes
    assert all(t.cue == "The pass key is" for t in asked)
    assert asked[0].reply_prefix("completion") == " The pass key is"     # after "Answer:"
    assert asked[0].reply_prefix("chat") == "The pass key is"
    q2 = generate("nq_qa", ctx=1024, turns=2, seed=0, index=0, tokens=tokens, fmt="completion")
    assert all(t.reply_prefix("completion") == "" for t in q2.turns)     # no cue: a plain answer
    assert generate("open_generation", ctx=1024, turns=2, seed=0, index=0, tokens=tokens,
                    fmt="completion").system.count("Describe Document [1]") == 1     # its own example


def test_splits_share_no_data_and_no_case(tokens):
    from loopserve_edge.bench.data import Corpus

    dev, test = Corpus("dev"), Corpus("test")
    assert dev.nq and test.nq and not {it.index for it in dev.nq} & {it.index for it in test.nq}
    assert not {r[0][0] for r in dev.kv} & {r[0][0] for r in test.kv}
    titles = {"dev": {it.text[:80] for it in dev.nq}, "test": {it.text[:80] for it in test.nq}}
    for task in ("nq_qa", "passkey", "kv_retrieval", "chained"):
        a = generate(task, ctx=1024, turns=2, seed=0, index=0, tokens=tokens, split="dev")
        b = generate(task, ctx=1024, turns=2, seed=0, index=0, tokens=tokens, split="test")
        assert a.id != b.id and a.digest() != b.digest() and ".dev." in a.id and ".test." in b.id
        text_a, text_b = a.turns[0].user, b.turns[0].user
        # every passage a dev case quotes is a dev passage, and none is a test passage
        quoted_a = {s for s in titles["dev"] | titles["test"] if s in text_a}
        quoted_b = {s for s in titles["dev"] | titles["test"] if s in text_b}
        assert quoted_a <= titles["dev"] and quoted_b <= titles["test"], task
    with pytest.raises(ValueError, match="unknown split"):
        Corpus("train")


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_per_seed(task, tokens):
    a = generate(task, ctx=1024, turns=2, seed=3, index=1, tokens=tokens)
    b = generate(task, ctx=1024, turns=2, seed=3, index=1, tokens=tokens)
    c = generate(task, ctx=1024, turns=2, seed=4, index=1, tokens=tokens)
    assert a == b and a.digest() == b.digest()
    assert c.digest() != a.digest()


@pytest.mark.parametrize("task", ["passkey", "kv_retrieval", "chained", "docs_over_turns"])
def test_question_positions(task, tokens):
    cases = {p: generate(task, ctx=1024, turns=2, seed=0, index=0, tokens=tokens, position=p)
             for p in ("before", "after", "later")}
    before, after, later = cases["before"].turns, cases["after"].turns, cases["later"].turns
    first = next(t for t in after if t.scorer)
    question = first.user.rsplit("\n\n", 1)[1]
    assert len(first.user) > 4 * len(question)              # material, then the question
    first_b = next(t for t in before if t.scorer)
    assert first_b.user.startswith(question)                # the question, then the material
    assert later[0].scorer is None and later[0].user.endswith(ACK)
    asked = next(t for t in later if t.scorer)
    # on its own, in a later turn (the material fits the layout, so which record is asked
    # may differ between layouts)
    assert "\n\n" not in asked.user and asked.scorer == first.scorer and len(asked.user) < 2 * len(question)
    assert len(later) > len(after)


def test_families_refuse_positions_they_do_not_have(tokens):
    assert FAMILIES["nq_qa_first"].positions == ("before",)
    with pytest.raises(ValueError, match="no 'before' variant"):
        generate("state_tracking", ctx=1024, turns=2, seed=0, index=0, tokens=tokens, position="before")


def test_layout_without_a_model():
    q = Question("Q?", ("a",), "contains")
    blocks = [Block("M1", None), Block("M2", q), Block("", q)]
    assert [t.user for t in layout(blocks, "after")] == [f"M1\n\n{ACK}", "M2\n\nQ?", "Q?"]
    assert [t.user for t in layout(blocks, "before")] == [f"M1\n\n{ACK}", "Q?\n\nM2", "Q?"]
    assert [t.user for t in layout(blocks, "later")] == [f"M1\n\n{ACK}", f"M2\n\n{ACK}", "Q?", "Q?"]
    assert [t.scorer for t in layout(blocks, "later")] == [None, None, "contains", "contains"]


# -- scorers ------------------------------------------------------------------------------

def test_scorers_on_hand_cases():
    assert scoring.exact("The Beatles.", ["beatles"]) == 1.0
    assert scoring.exact("The Beatles were a band", ["beatles"]) == 0.0
    assert scoring.contains("It was Wilhelm Conrad Röntgen, in 1901.", ["Wilhelm Conrad Röntgen"]) == 1.0
    assert scoring.contains("Röntgenology", ["Röntgen"]) == 0.0          # whole words only
    assert scoring.contains("anything", ["x", "anything else", "anything"]) == 1.0
    assert scoring.numeric("The pass key is 29,325.", ["29325"]) == 1.0
    assert scoring.numeric("It is 4416950, not 6710281", ["6710281"]) == 0.0  # the first number counts
    assert scoring.numeric("no number here", ["7"]) == 0.0
    assert scoring.numeric("Seven: 7.", ["7"]) == 1.0
    items = ("lantern", "kite", "teapot")
    assert scoring.choice("Mostly a kite, then a lantern.", ["kite"], items) == 1.0
    assert scoring.choice("A lantern; a kite less often.", ["kite"], items) == 0.0
    assert scoring.choice("I don't know.", ["kite"], items) == 0.0


def test_rouge_l_by_lcs():
    assert scoring.lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert scoring.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # normalised words: cat sat on mat / cat lay on mat -> LCS 3 of 4 and 4
    assert scoring.rouge_l("The cat sat on the mat.", "A cat lay on a mat") == pytest.approx(0.75)
    assert scoring.rouge_l("completely different", "nothing shared here") == 0.0
    assert scoring.score("rouge_full", "a b", (), full_reply="a b") == 1.0
    with pytest.raises(ValueError):
        scoring.score("rouge_full", "a b", ())


# -- fidelity -----------------------------------------------------------------------------

def test_top_k_kl_is_a_close_lower_bound_of_the_exact_kl():
    rng = np.random.default_rng(0)
    p = rng.normal(size=5000) * 3
    q = p + rng.normal(size=5000) * 0.5
    exact = fidelity.kl_to(fidelity.RefStep.of(p, None), q)
    top = fidelity.kl_to(fidelity.RefStep.of(p, 256), q)
    assert exact > 0 and 0 <= top <= exact + 1e-9
    assert top == pytest.approx(exact, rel=0.2)
    assert fidelity.kl_to(fidelity.RefStep.of(p, 64), p) == pytest.approx(0.0, abs=1e-9)


def test_teacher_forcing_and_the_shortcut_for_identical_replies(tmp_path):
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=100) for _ in range(5)]
    rec = fidelity.GreedyRecorder(top_k=16)
    assert [rec(lg) for lg in logits] == [int(np.argmax(lg)) for lg in logits]
    refs = rec.steps
    fidelity.save_refs(tmp_path / "r.npz", [refs, refs[:2]])
    back = fidelity.load_refs(tmp_path / "r.npz")
    assert [s.token for s in back[0]] == rec.tokens and len(back[1]) == 2
    # a method whose distributions differ only in the last step
    other = [lg.copy() for lg in logits]
    other[-1][refs[-1].token] -= 100
    f = fidelity.TeacherForcer(back[0])
    assert [f(lg) for lg in other] == rec.tokens         # forced along full's tokens
    s = fidelity.summary([f])
    assert s["same_greedy"] == pytest.approx(0.8) and s["steps"] == 5 and s["mean_kl"] > 0
    same = fidelity.GreedyRecorder()
    for lg in logits:
        same(lg)
    assert fidelity.summary([same.forced_along(back[0])])["same_greedy"] == 1.0
    # the turns after the first on their own: a perfect first turn does not lift them
    first = fidelity.TeacherForcer(back[0])
    for lg in logits:
        first(lg)
    two = fidelity.summary([first, f])
    assert two["same_greedy"] == pytest.approx(0.9) and two["steps"] == 10
    assert two["later_same_greedy"] == pytest.approx(0.8) and two["later_steps"] == 5
    assert two["later_mean_kl"] == pytest.approx(s["mean_kl"])
    assert fidelity.summary([f])["later_same_greedy"] is None
    diverged = fidelity.GreedyRecorder()
    for lg in other:
        diverged(lg)
    assert diverged.forced_along(back[0]) is None        # needs the second pass


# -- methods ------------------------------------------------------------------------------

def test_methods_expand_full_first_and_report_missing_sparse_prefill():
    runs = expand(["snapkv", "loopserve", "loopserve-prefill"], [128, 512], [0.9])
    assert [r.label for r in runs] == ["full", "snapkv@128", "snapkv@512", "loopserve@128",
                                       "loopserve@512", "loopserve-prefill@a0.9"]
    assert runs[1].config().policy == "snapkv" and runs[1].config().budget == 128
    assert runs[0].unavailable() is None and runs[2].unavailable() is None
    from loopserve_edge import LoopServeConfig

    try:
        LoopServeConfig(sparse_prefill=True)
        prefill_ready = True
    except ValueError:
        prefill_ready = False
    assert (runs[-1].unavailable() is None) == prefill_ready
    if not prefill_ready:
        assert runs[-1].unavailable() == "sparse prefill not implemented"
    assert set(METHODS) == {"full", "streaming", "snapkv", "h2o", "loopserve", "loopserve-defer",
                            "snapkv-head", "h2o-head", "loopserve-head", "loopserve-defer-head",
                            "loopserve-prefill", "loopserve-prefill-r4", "loopserve-prefill-r2",
                            "loopserve-prefill-u4096", "loopserve-prefill-u8192", "loopserve-prefill-q32", "loopserve-both",
                            "streaming-chunked", "snapkv-chunked",
                            "snapkv-head-chunked", "loopserve-defer-chunked", "loopserve-defer-head-chunked",
                            "loopserve-d32", "loopserve-d32-head", "loopserve-d32-q8", "loopserve-d32-head-q8",
                            "loopserve-d32-s4-head", "loopserve-d64", "loopserve-d64-head", "pyramidkv", "ada-snapkv", "loopserve-d32-head-ada",
                            "loopserve-d32-head-pyramid", "loopserve-d64-head-span32", "loopserve-d64-span32"}
    assert Run(METHODS["loopserve-defer"], 256).config().defer_cut == 4
    spans = Run(METHODS["loopserve-d64-head-span32"], 256).config()
    assert (spans.span, spans.granularity, spans.defer_cut) == (32, "head", 64)
    assert Run(METHODS["loopserve-d64-span32"], 256).config().granularity == "cell"
    # PyramidKV and Ada-KV: SnapKV head-wise with their allocations
    ada = Run(METHODS["ada-snapkv"], 256).config()
    assert (ada.policy, ada.granularity, ada.allocation, ada.cells) == ("snapkv", "head", "ada", 4 + 64 + 2 * 188 - 9)
    assert Run(METHODS["pyramidkv"], 256).config().allocation == "pyramid"
    # the default configuration is loopserve-d64 (loopserve-d32 until session 22), and the bench
    # runs it against the baselines unless told otherwise
    assert Run(METHODS["loopserve-d64"], 256).config() == LoopServeConfig(max_resident=1, policy="loopserve", budget=256)
    from loopserve_edge.cli import bench as bench_command
    default = next(p.default for p in bench_command.params if p.name == "methods").split(",")
    assert set(default) <= set(METHODS) and "loopserve-d64" in default
    assert Run(METHODS["loopserve-d32"], 256).config().defer_cut == 32
    # a stored selection serves the ubatches of one decode call: the input goes in one batch
    r4 = Run(METHODS["loopserve-prefill-r4"], None, 0.95)
    assert r4.config().prefill_reuse == 4 and r4.config().sparse_prefill
    from loopserve_edge.bench.harness import BenchSpec, llama_kwargs
    kw4, kw1 = (llama_kwargs(BenchSpec(model="m.gguf"), r, 8192) for r in (r4, Run(METHODS["loopserve-prefill"], None, 0.95)))
    assert (kw4["n_batch"], kw4["n_ubatch"], kw1["n_batch"], kw1["n_ubatch"]) == (8192, 2048, 2048, 2048)
    u = llama_kwargs(BenchSpec(model="m.gguf"), Run(METHODS["loopserve-prefill-u4096"], None, 0.95), 8192)
    assert (u["n_batch"], u["n_ubatch"]) == (4096, 4096)
    u8 = llama_kwargs(BenchSpec(model="m.gguf"), Run(METHODS["loopserve-prefill-u8192"], None, 0.95), 8192)
    assert (u8["n_batch"], u8["n_ubatch"]) == (8192, 8192)
    assert Run(METHODS["loopserve-prefill-r2"], None, 0.95).config().prefill_reuse == 2
    assert Run(METHODS["loopserve-prefill-q32"], None, 0.95).config().last_q == 32
    assert Run(METHODS["loopserve-d32-head"], 256).config().granularity == "head"
    assert Run(METHODS["loopserve"], 256).config().defer_cut == 0
    s4 = Run(METHODS["loopserve-d32-s4-head"], 256).config()
    assert (s4.defer_cut, s4.defer_scored, s4.granularity) == (32, 4, "head")
    d64 = Run(METHODS["loopserve-d64-head"], 256).config()
    assert (d64.defer_cut, d64.defer_scored, d64.granularity) == (64, None, "head")
    head = Run(METHODS["loopserve-defer-head"], 256).config()
    assert (head.granularity, head.defer_cut, head.policy) == ("head", 4, "loopserve")
    assert Run(METHODS["snapkv"], 256).config().granularity == "cell"
    # head-wise cuts cannot run with V transposed: their runs get flash attention regardless
    from loopserve_edge.bench.harness import BenchSpec, llama_kwargs

    spec = BenchSpec(model="m", flash_attn=False)
    assert llama_kwargs(spec, Run(METHODS["snapkv-head"], 256), 2048)["flash_attn"] is True
    assert llama_kwargs(spec, Run(METHODS["snapkv"], 256), 2048)["flash_attn"] is False
    # ... and then every run of the call has it, full (the reference) too: the kernels round apart
    assert not BenchSpec(model="m", methods=("full", "snapkv")).one_kernel().flash_attn
    for needs in ("snapkv-head", "loopserve-d32-q8"):
        one = BenchSpec(model="m", methods=("full", "snapkv", needs)).one_kernel()
        assert one.flash_attn and one.methods == ("full", "snapkv", needs)
        assert llama_kwargs(one, Run(METHODS["full"], None), 2048)["flash_attn"] is True
        assert llama_kwargs(one, Run(METHODS["snapkv"], 256), 2048)["flash_attn"] is True
    # quantized K/V: q8_0 for K and V, with flash attention (quantized V is never transposed)
    q8 = llama_kwargs(spec, Run(METHODS["loopserve-d32-q8"], 512), 2048)
    assert (q8["type_k"], q8["type_v"], q8["flash_attn"]) == (8, 8, True)
    assert "type_k" not in llama_kwargs(spec, Run(METHODS["loopserve-d32"], 512), 2048)
    assert Run(METHODS["loopserve-d32-head-q8"], 256).config() == Run(METHODS["loopserve-d32-head"], 256).config()
    # budgeted prefill: a context of twice the budget, whatever the dialogue's length
    assert llama_kwargs(spec, Run(METHODS["snapkv-chunked"], 256), 2048)["n_ctx"] == 512
    assert llama_kwargs(spec, Run(METHODS["snapkv"], 256), 2048)["n_ctx"] == 2048
    assert Run(METHODS["loopserve-defer-head-chunked"], 256).config() == head
    assert Run(METHODS["loopserve-both"], 256, 0.95).label == "loopserve-both@256@a0.95"


# -- the harness, end to end, through the CLI -------------------------------------------

SMALL = ["--tasks", "passkey,open_generation", "--methods", "full,streaming", "--budgets", "128",
         "--ctx", "1024", "--turns", "2", "--cases-per-task", "2", "--threads", "2"]


def bench(args, env=None, timeout=900):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def small_run(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    r = bench(SMALL + ["--out", str(out)])
    assert r.returncode == 0, r.stderr
    return out, r


def test_bench_records_every_metric_and_writes_the_summary(small_run):
    out, r = small_run
    runs = lines(out / "runs.jsonl")
    assert sorted(Counter(x["method"] for x in runs).items()) == [("full", 4), ("streaming@128", 4)]
    for x in runs:
        assert "error" not in x, x["error"]
        assert x["state_bytes"] > 0 and x["peak_rss_mb"] > 50
        assert len(x["turns"]) >= 2
        for t in x["turns"]:
            assert t["ttft_s"] > 0 and t["decode_tokens"] >= 1 and t["prompt_tokens"] > 0
        if x["method"] == "streaming@128":
            interval = loopserve_edge.LoopServeConfig(policy="streaming", budget=128).interval
            assert all(t["kv_cells"] <= 128 + interval for t in x["turns"])
            assert 0 <= x["fidelity"]["same_greedy"] <= 1 and x["fidelity"]["mean_kl"] >= 0
            assert 0 <= x["fidelity"]["later_same_greedy"] <= 1
            assert 0 < x["fidelity"]["later_steps"] < x["fidelity"]["steps"]
        else:
            assert x["turns"][0]["kv_cells"] > 800   # the whole context is kept
    assert len(list((out / "refs").glob("*.npz"))) == 4
    md = (out / "summary.md").read_text()
    assert "| passkey |" in md and "| open_generation |" in md and "streaming@128" in md
    assert "Fidelity in the turns after the first only" in md and "| streaming@128 | " in md
    assert md in r.stdout
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("ctx,task,method") and len(rows) == 1 + 2 * 3
    for name in ("score_vs_budget", "ttft_vs_context", "kv_cells_vs_turn"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_full_scores_what_a_hand_check_says(small_run):
    """The 135M model finds a pass key at 1K tokens; open generation is scored against full."""
    out, _ = small_run
    from loopserve_edge.bench.scoring import rouge_l

    cases = {c["id"]: c for c in lines(out / "cases.jsonl")}
    runs = {(x["case"], x["method"]): x for x in lines(out / "runs.jsonl")}
    checked = found = 0
    for (cid, method), x in runs.items():
        case = cases[cid]
        if method != "full":
            if case["task"] == "open_generation":
                full = runs[(cid, "full")]
                for t, mine, ref in zip(case["turns"], x["turns"], full["turns"]):
                    if t["scorer"]:
                        assert mine["score"] == pytest.approx(rouge_l(mine["reply"], ref["reply"]))
            continue
        if case["task"] == "passkey":
            key = re.search(r"The pass key is (\d+)\. Remember it", case["turns"][0]["user"]).group(1)
            for t, rec in zip(case["turns"], x["turns"]):
                if t["scorer"]:
                    # scored 1 exactly when the reply holds the key
                    assert rec["score"] == (1.0 if key in rec["reply"] else 0.0), rec["reply"]
                    found += key in rec["reply"]
                    checked += 1
        else:
            assert x["score"] == 1.0   # full attention is its own reference
    # all four on an AVX-512 machine; on an AVX2 one (other sums in the Q4_1 products) the model
    # once wrote 80876 for 80875
    assert checked == 4 and found >= 3


def test_bench_resumes_without_rerunning(small_run):
    out, _ = small_run
    before = (out / "runs.jsonl").read_text().splitlines()
    again = bench(SMALL + ["--out", str(out)])
    assert again.returncode == 0, again.stderr
    assert "resuming: 8 of 8 runs already done" in again.stderr
    assert (out / "runs.jsonl").read_text().splitlines() == before
    # a run lost (say, cut short) is the only one done again
    (out / "runs.jsonl").write_text("\n".join(before[:-1]) + "\n" + before[-1][:40])
    third = bench(SMALL + ["--out", str(out)])
    assert third.returncode == 0, third.stderr
    assert "resuming: 7 of 8 runs already done" in third.stderr
    from loopserve_edge.bench.harness import read_jsonl

    kept = read_jsonl(out / "runs.jsonl")        # the cut line is passed over
    assert len(kept) == 8
    redone = kept[-1]
    assert (redone["case"], redone["method"]) == (json.loads(before[-1])["case"], json.loads(before[-1])["method"])
    report = bench(["--report-only", "--out", str(out)])
    assert report.returncode == 0 and "| passkey |" in report.stdout
    # a head-wise method turns flash attention on for every run, full too: this folder's full ran
    # without it, so the call is refused and the folder left as it was
    runs = (out / "runs.jsonl").read_bytes()
    head = bench(SMALL[:2] + ["--methods", "full,snapkv-head"] + SMALL[4:] + ["--out", str(out)])
    assert head.returncode != 0
    assert "holds runs with flash attention off, this run has it on" in head.stderr
    assert "Traceback" not in head.stderr and (out / "runs.jsonl").read_bytes() == runs
    assert json.loads((out / "bench.json").read_text())["spec"]["flash_attn"] is False
    # a folder brought back without cases.jsonl (the GPU box's) reports the same from its runs
    bare = out.parent / "bare"
    bare.mkdir()
    for name in ("bench.json", "runs.jsonl"):
        (bare / name).write_bytes((out / name).read_bytes())
    again = bench(["--report-only", "--out", str(bare)])
    assert again.returncode == 0, again.stderr
    assert (bare / "summary.csv").read_text() == (out / "summary.csv").read_text()
    assert (bare / "plots" / "kv_cells_vs_turn.png").exists()


def one_error_line(r):
    assert r.returncode != 0
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    return err[0]


def test_bench_bad_input_is_one_line(tmp_path):
    out = ["--out", str(tmp_path / "o")]
    assert "unknown task 'nope'" in one_error_line(bench(["--tasks", "passkey,nope"] + out))
    assert "unknown method 'lru'" in one_error_line(bench(["--methods", "lru"] + out))
    assert "not a number" in one_error_line(bench(["--ctx", "big"] + out))
    assert "no such model file" in one_error_line(bench([str(tmp_path / "none.gguf")] + out))
    line = one_error_line(bench(out, env={"LOOPSERVE_DATA": str(tmp_path / "nodata")}))
    assert "benchmark data not found" in line and "LOOPSERVE_DATA" in line
    assert "holds no benchmark results" in one_error_line(bench(["--report-only"] + out))
    other = tmp_path / "levels.json"
    other.write_text(json.dumps({"model": "gemma-3-270m", "levels": {"8192": {}}}))
    assert "calibrated for gemma-3-270m" in one_error_line(
        bench(["--levels", str(other), "--tasks", "passkey", "--cases-per-task", "1"] + out))
    assert not (tmp_path / "o").exists()
