"""Difficulty calibration (which level each family runs at) and the options that feed it
to the benchmark: levels files, budgets as fractions of the context. No model needed."""
import json

import pytest

from loopserve_edge.bench.calibrate import choose
from loopserve_edge.bench.levels import levels_for, model_key
from loopserve_edge.bench.cli import _numbers
from loopserve_edge.bench.harness import BenchError, BenchSpec, read_levels, resolve_format


def test_choose_takes_the_hardest_level_that_reaches_the_target():
    tried = [{"knobs": {"hops": 3}, "score": 0.1}, {"knobs": {"hops": 2}, "score": 0.5},
             {"knobs": {"hops": 1}, "score": 0.9}]
    assert choose(tried, 0.5) == {"hops": 2}
    assert choose(tried, 0.95) == {"hops": 1}            # none reaches it: the best one
    flat = [{"knobs": {"docs": None}, "score": 0.3}, {"knobs": {"docs": 6}, "score": 0.1},
            {"knobs": {"docs": 2}, "score": 0.3}]
    assert choose(flat, 0.5) == {"docs": None}           # the hardest of equals


def test_levels_for_a_context_length():
    levels = {"model": "m", "levels": {"2048": {"passkey": {}}, "8192": {"chained": {"others": 0}}}}
    assert levels_for(levels, 2048) == {"passkey": {}}
    assert levels_for(levels, 4096) == {"passkey": {}}                   # the largest below
    assert levels_for(levels, 32768) == {"chained": {"others": 0}}
    assert levels_for(levels, 1024) == {"passkey": {}}                   # below all: the smallest
    assert levels_for(None, 2048) == {}


def test_model_key_and_format_come_from_the_gguf_metadata():
    assert model_key({"general.basename": "smollm2", "general.size_label": "135M"}) == "smollm2-135m"
    assert model_key({"general.name": "Gemma 3 270m"}) == "gemma-3-270m"
    assert resolve_format("auto", {"tokenizer.chat_template": "{{ x }}"}) == "chat"
    assert resolve_format("auto", {}) == "completion"
    assert resolve_format("chat", {}) == "chat"


def test_bad_levels_files_are_one_clear_error(tmp_path):
    with pytest.raises(BenchError, match="cannot read the levels file"):
        read_levels(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"levels": {}}))
    with pytest.raises(BenchError, match="not a levels file"):
        read_levels(str(bad))


def test_budgets_as_fractions_of_the_context():
    assert _numbers("1/8,1/4,300", "--budgets", fractions=True) == (0.125, 0.25, 300)
    with pytest.raises(BenchError, match="not a fraction"):
        _numbers("3/2", "--budgets", fractions=True)
    with pytest.raises(BenchError, match="not a number"):
        _numbers("1/0", "--budgets", fractions=True)
    spec = BenchSpec(model="m", budgets=(0.125, 0.25, 300), methods=("snapkv",))
    assert spec.budgets_for(2048) == [256, 512, 300]
    assert [r.label for r in spec.runs(8192)] == ["full", "snapkv@1024", "snapkv@2048", "snapkv@300"]
