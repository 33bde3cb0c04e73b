"""The package_docs family: questions about the documentation and source files of installed
Python packages, split by package, fitted to the context, every name taken from the text."""
import re

import loopserve_edge  # noqa: F401  (before numpy: see conftest.py)
import pytest

from loopserve_edge.bench import package_files
from loopserve_edge.bench.dialogues import Tokens
from loopserve_edge.bench.tasks import FAMILIES, generate, package_text
from loopserve_edge.errors import LoopServeError

TASK = "package_docs"


@pytest.fixture(scope="module")
def tokens(default_model):
    from loopserve_edge import Llama, LoopServeConfig

    llm = Llama(default_model, n_ctx=256, n_threads=2, loopserve=LoopServeConfig(max_resident=1))
    yield Tokens(llm)
    llm.close()


def installed(split):
    return [n for n in package_files.SPLIT_PACKAGES[split] if package_files.find_package(n) is not None]


def section(material, label):
    """The text of one file in the material: from its "File:" line to the next one."""
    head = f"File: {label}\n\n"
    assert head in material, label
    body = material.split(head, 1)[1]
    return re.split(r"\n\nFile: \S+\n\n", body, maxsplit=1)[0]


def check_question(material, turn, q):
    """What the question names is in the material, in the file it names."""
    text = turn.user if "\n\n" not in turn.user else turn.user.rsplit("\n\n", 1)[1]
    assert f"file {q['file']}" in text
    sec = section(material, q["file"])
    names = re.findall(r"`([^`]+)`", text)
    if q["kind"] in ("function", "arguments"):
        assert names[0] == q["name"]
        assert re.search(rf"^\s*(async\s+)?def {re.escape(q['name'])}\(", sec, re.M), (q, text)
        if len(names) == 2:   # a method: its class as well
            assert re.search(rf"^class {re.escape(names[1])}\b", sec, re.M), (q, text)
    elif q["kind"] == "class":
        assert names == [q["name"]] and re.search(rf"^class {re.escape(q['name'])}\b", sec, re.M), (q, text)
    elif q["kind"] in ("heading", "line"):
        quoted = re.search(r'"(.+)"', text).group(1)
        lines = {line.strip() for line in sec.split("\n")}
        lines |= {re.sub(r"^#{1,6}\s+", "", line).rstrip(" #") for line in lines}
        assert quoted == q["name"] and quoted in lines, (q, text)
    else:
        assert q["kind"] == "file" and q["name"] == q["file"] and len(sec) >= 400


def test_the_family_is_registered():
    fam = FAMILIES[TASK]
    assert fam.positions == ("after", "later") and fam.build is package_text.package_docs
    assert fam.examples and all("\n" not in answer for _, answer in fam.examples)


@pytest.mark.parametrize("split", ["dev", "test"])
def test_cases_fit_the_length_and_name_what_is_in_the_text(split, tokens):
    if not installed(split):
        pytest.skip(f"none of the {split} packages is installed")
    for ctx, turns in ((1024, 2), (4096, 3)):
        for index in range(3):
            case = generate(TASK, ctx=ctx, turns=turns, seed=0, index=index, tokens=tokens, split=split)
            n = tokens.dialogue(case.system, case.turns)
            assert 0.9 * ctx <= n <= ctx, (split, ctx, index, n)
            assert case.meta["tokens"] == n
            scored = [t for t in case.turns if t.scorer]
            assert len(scored) == turns == len(case.meta["questions"])
            assert all(t.scorer == "rouge_full" and t.answers == () and t.max_tokens == 48 for t in scored)
            material = case.turns[0].user
            assert material.startswith(f"Files from the Python package {case.meta['package']} "
                                       f"(version {case.meta['version']}):")
            # the files, in the order the meta lists them; later turns are questions only
            assert [m for m in re.findall(r"^File: (\S+)$", material, re.M)] == case.meta["files"]
            assert all("File: " not in t.user for t in case.turns[1:])
            pkg = package_files.find_package(case.meta["package"])
            assert set(case.meta["files"]) <= {f.label for f in pkg.files}
            for t, q in zip(scored, case.meta["questions"]):
                check_question(material, t, q)
            # each question about another part of the text
            assert len({(q["kind"] == "arguments" and "function" or q["kind"], q["file"], q["name"])
                        for q in case.meta["questions"]}) == turns


def test_questions_spread_over_the_text(tokens):
    """The i-th of n questions is about the i-th stretch of the material when it has a target."""
    case = generate(TASK, ctx=4096, turns=3, seed=0, index=0, tokens=tokens, split=installed_split())
    depths = sorted(q["depth"] for q in case.meta["questions"])
    assert len(set(int(d * 3) for d in depths)) >= 2 and depths[-1] - depths[0] > 0.2, depths


def installed_split():
    return "dev" if installed("dev") else "test"


def test_generation_is_deterministic(tokens):
    split = installed_split()
    a = generate(TASK, ctx=1024, turns=2, seed=3, index=1, tokens=tokens, split=split)
    b = generate(TASK, ctx=1024, turns=2, seed=3, index=1, tokens=tokens, split=split)
    assert a == b and a.digest() == b.digest()
    others = {generate(TASK, ctx=1024, turns=2, seed=s, index=1, tokens=tokens, split=split).digest()
              for s in (4, 5)}
    assert a.digest() not in others
    # the texts do not depend on what was read before (the caches)
    package_files.find_package.cache_clear()
    package_files.read_text.cache_clear()
    c = generate(TASK, ctx=1024, turns=2, seed=3, index=1, tokens=Tokens(tokens.llm), split=split)
    assert c == a


def test_dev_and_test_use_disjoint_packages_and_files(tokens):
    dev, test = package_files.SPLIT_PACKAGES["dev"], package_files.SPLIT_PACKAGES["test"]
    assert not set(dev) & set(test)
    if not installed("dev") or not installed("test"):
        pytest.skip("needs packages of both splits")
    seen = {}
    for split in ("dev", "test"):
        cases = [generate(TASK, ctx=1024, turns=2, seed=0, index=i, tokens=tokens, split=split)
                 for i in range(6)]
        names = {p["name"] for c in cases for p in c.meta["packages"]}
        assert names <= set(package_files.SPLIT_PACKAGES[split])
        seen[split] = (names, {f for c in cases for f in c.meta["files"]})
    assert not seen["dev"][0] & seen["test"][0]
    assert not seen["dev"][1] & seen["test"][1]
    # and no file of one split's packages is a file of the other's
    labels = {s: {f.label for n in installed(s) for f in package_files.find_package(n).files}
              for s in ("dev", "test")}
    assert not labels["dev"] & labels["test"]


def test_missing_packages_are_skipped_and_none_is_one_clear_error(tokens, monkeypatch):
    split = installed_split()
    keep = installed(split)[-1]
    real = package_files.find_package
    monkeypatch.setattr(package_files, "find_package", lambda name: real(name) if name == keep else None)
    case = generate(TASK, ctx=1024, turns=2, seed=0, index=0, tokens=tokens, split=split)
    assert case.meta["package"] == keep
    monkeypatch.setattr(package_files, "find_package", lambda name: None)
    with pytest.raises(ValueError) as err:
        generate(TASK, ctx=1024, turns=2, seed=0, index=0, tokens=tokens, split=split)
    msg = str(err.value)
    assert "\n" not in msg and f"none of the {split} split's packages is installed" in msg
    assert all(name in msg for name in package_files.SPLIT_PACKAGES[split])
    assert isinstance(err.value, LoopServeError)    # the CLI prints it as one line


def test_small_packages_are_joined_when_one_has_too_little_text(tokens, monkeypatch):
    small = [n for n in ("iniconfig", "markupsafe") if package_files.find_package(n) is not None]
    if len(small) < 2:
        pytest.skip("needs iniconfig and markupsafe")
    monkeypatch.setitem(package_files.SPLIT_PACKAGES, "dev", tuple(small))
    case = generate(TASK, ctx=8192, turns=2, seed=0, index=0, tokens=tokens, split="dev")
    assert sorted(p["name"] for p in case.meta["packages"]) == sorted(small)
    assert case.turns[0].user.startswith("Files from the Python packages ")
    n = case.meta["tokens"]
    assert n <= 8192     # all the text there is: it may fall short of the context


def test_headings_and_line_cuts_without_a_model():
    text = ("Title\n=====\n\nIntro.\n\n```sh\n# not a heading\n```\n\n## Usage ##\n\nUse it.\n\n"
            "Notes\n-----\n\n===== =====\na     b\n===== =====\n\n    Indented\n    --------\n")
    assert package_text.headings(text) == [(0, "Title"), (9, "Usage"), (13, "Notes")]

    class Chars:   # one token a character
        def count(self, s):
            return len(s)

    src = "def f(x):\n    return x\n\n\ndef g():\n    pass"
    assert package_text.cut_lines(src, 23, Chars()) == "def f(x):\n    return x"
    assert package_text.cut_lines(src, 1000, Chars()) == src
    assert package_text.cut_lines("one two three", 8, Chars()) == "one two"


def test_readme_badges_are_left_out():
    md = ("<div align=\"center\"><img src=\"logo.svg\"></div>\n\n"
          "[![PyPI](https://img.shields.io/pypi/v/x)](https://pypi.org/x)\n"
          "[![Docs](https://x.io/badge.svg)](\nhttps://x.io)\n\n# X\n\nX does things. ![pic](a.png)\n")
    assert package_files.strip_badges(md) == "# X\n\nX does things."
    rst = (".. image:: https://x.io/logo.svg\n   :align: center\n\n------\n\n|pypi| |licence|\n\n"
           ".. |pypi| image:: https://img.shields.io/pypi/v/x.svg\n    :target: https://pypi.org/x\n\n"
           "X\n=\n\n| a | b |\n\nText.\n")
    assert package_files.strip_badges(rst) == "X\n=\n\n| a | b |\n\nText."
