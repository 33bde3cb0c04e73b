"""package_docs: multi-turn questions about real long texts that are not
questions-with-answers, the documentation and source files of installed Python packages
(package_files). The questions have no reference answer: a reply is scored against full
attention's reply (rouge_full), and what matters are the fidelity columns (the same greedy
token as full and the KL to it, teacher-forced along full's replies).

A case: a package of the split (drawn with the case's random source), its files in a
seeded order, each under a "File: <path>" line, sized to the material budget. The
documentation (the README from the package metadata, shipped .rst/.md/.txt files) takes at
most a third of it, the source files the rest; files are taken whole while they fit, then
the first that did not is cut (at the end of a line or word) to fill what is left and comes
last. One question a turn, each about another part of the text (the n-th of n_q about the
n-th stretch of the material, asked in a seeded order): what a function or method does,
which arguments it takes, what a class is for, what the documentation says under a heading,
what a file is for. Every name a question gives is taken from the material itself
(functions and classes with `ast`, headings from reST/setext underlines and Markdown `#`
lines). Material too short for n_q such questions (a small context with many turns) is
asked about quoted lines of it, then the same things again.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass

from .. import package_files
from ..dialogues import Block, Question, Tokens
from ..material import longest
from .gen import Gen

DOCS_SHARE = 3        # the documentation takes at most 1/DOCS_SHARE of the material
SEP_TOKENS = 1        # the blank line between files
MIN_LEFT = 24         # tokens worth filling with a cut file
MAX_SKIPPED = 12      # files too long for the room left that are passed over before cutting one
CHARS_PER_TOKEN = 5   # a package "has enough text" for a budget when size / this >= budget
MAX_DIGITS = 0.25     # source files more digits than this are data tables, passed over
REPLY_TOKENS = 48
KINDS = ("function", "arguments", "class", "heading", "file")


@dataclass
class Part:
    package: str
    label: str
    kind: str            # "source" or "docs"
    full: str            # the whole file
    body: str            # what the material holds of it (a line prefix when cut)
    cut: bool
    offset: int = 0      # where the "File:" line starts in the material
    start: int = 0       # where the body starts in the material


@dataclass(frozen=True)
class Target:
    kind: str
    file: str
    name: str
    pos: int             # character offset in the material
    key: tuple
    text: str            # the question


def _header(label: str) -> str:
    return f"File: {label}\n\n"


def _usable(text: str, kind: str) -> bool:
    if not text.strip():
        return False
    return kind == "docs" or sum(c.isdigit() for c in text) <= MAX_DIGITS * len(text)


def cut_lines(text: str, n_tokens: int, tokens: Tokens) -> str:
    """The longest prefix of `text` with at most n_tokens tokens that ends at the end of a
    line or of a word: whole lines (layout and indentation kept, unlike material.truncate),
    then as many words of the next line as fit. Always a prefix of `text`."""
    if n_tokens <= 0:
        return ""
    if tokens.count(text) <= n_tokens:
        return text
    lines, total = [], 0
    for line in text.split("\n"):          # no prefix of more than 16 characters a token
        if lines and total + len(line) > 16 * n_tokens:
            break
        lines.append(line)
        total += len(line) + 1
    # whole lines (the last line in `lines` never fits whole), then words of the next one
    lo = longest(len(lines) - 1, lambda k: tokens.count("\n".join(lines[:k])) <= n_tokens)
    head = "\n".join(lines[:lo] + [""]) if lo else ""
    ends = [m.end() for m in re.finditer(r"\S+", lines[lo])]
    a = longest(len(ends), lambda k: tokens.count(head + lines[lo][:ends[k - 1]]) <= n_tokens)
    return (head + lines[lo][:ends[a - 1]] if a else head).rstrip()


def _fill(files, room: int, tokens: Tokens) -> tuple[list[Part], int]:
    """Whole files in order while they fit in `room` tokens, then the first one that did
    not, cut to what is left; returns the parts and the tokens they take."""
    out: list[Part] = []
    left, skipped, to_cut = room, 0, None
    for pkg, f in files:
        if left < MIN_LEFT or skipped >= MAX_SKIPPED:
            break
        if f.size > 12 * left and to_cut is not None:   # far too long: not even read
            skipped += 1
            continue
        text = package_files.read_text(pkg, f)
        if not _usable(text, f.kind):
            continue
        n = tokens.count(_header(f.label) + text) + SEP_TOKENS
        if n <= left:
            out.append(Part(pkg, f.label, f.kind, text, text, False))
            left -= n
        else:
            to_cut = to_cut or (pkg, f, text)
            skipped += 1
    if to_cut is not None and left >= MIN_LEFT:
        pkg, f, text = to_cut
        body = cut_lines(text, left - tokens.count(_header(f.label)) - SEP_TOKENS, tokens)
        if body.strip():
            out.append(Part(pkg, f.label, f.kind, text, body, True))
            left -= tokens.count(_header(f.label) + body) + SEP_TOKENS
    return out, room - left


def _choose_packages(g: Gen) -> list:
    """One package of the split with text enough for the budget; when none has, all of
    them, in a seeded order."""
    pkgs = package_files.split_packages(g.corpus.split)
    big = [p for p in pkgs if p.size >= CHARS_PER_TOKEN * g.budget]
    if big:
        return [g.rng.choice(big)]
    order = list(pkgs)
    g.rng.shuffle(order)
    return order


def _intro(pkgs) -> str:
    names = ", ".join(f"{p.name} (version {p.version})" for p in pkgs)
    return f"Files from the Python package{'s' if len(pkgs) > 1 else ''} {names}:"


def _material(g: Gen, pkgs) -> tuple[str, list[Part]]:
    intro = _intro(pkgs)
    room = g.budget - g.tokens.count(intro) - SEP_TOKENS
    docs = [(p.name, f) for p in pkgs for f in p.files if f.kind == "docs"]
    source = [(p.name, f) for p in pkgs for f in p.files if f.kind == "source"]
    g.rng.shuffle(docs)
    g.rng.shuffle(source)
    doc_parts, used = _fill(docs, room // DOCS_SHARE, g.tokens)
    src_parts, _ = _fill(source, room - used, g.tokens)
    whole = [p for p in doc_parts + src_parts if not p.cut]
    g.rng.shuffle(whole)
    parts = whole + [p for p in doc_parts + src_parts if p.cut]
    pieces, pos = [intro], len(intro)
    for p in parts:
        p.offset = pos + 2
        p.start = p.offset + len(_header(p.label))
        unit = _header(p.label) + p.body
        pieces.append(unit)
        pos = p.offset + len(unit)
    text = "\n\n".join(pieces)
    assert all(text[p.start:p.start + len(p.body)] == p.body for p in parts)
    return text, parts


# -- what the questions can be about -----------------------------------------------------

_MD_HEADING = re.compile(r"^#{1,6}\s+(.+?)[\s#]*$")
_UNDERLINE = re.compile(r"^([=\-~^*+#\"'`:._])\1{2,}$")


def headings(text: str) -> list[tuple[int, str]]:
    """(line index, title) of the section headings of a README or documentation file:
    Markdown `#` lines (outside code fences) and reST/setext titles over an underline."""
    lines = text.split("\n")
    out, fence = [], False
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith(("```", "~~~")):
            fence = not fence
            continue
        if fence or not s or line[0].isspace():
            continue
        m = _MD_HEADING.match(line)
        if m:
            title = m.group(1).strip()
        elif (i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) and not _UNDERLINE.match(line)
              and len(lines[i + 1]) >= len(s)):
            title = s
        else:
            continue
        if (3 <= len(title) <= 70 and re.search(r"[A-Za-z]{2}", title)
                and not title.startswith(("..", "<", "!", "["))
                and not any(c in title for c in '"|`') and "](" not in title):
            out.append((i, title))
    return out


def _line_starts(text: str) -> list[int]:
    starts, pos = [], 0
    for line in text.split("\n"):
        starts.append(pos)
        pos += len(line) + 1
    return starts


def _lines_held(p: Part) -> int:
    """How many whole lines of the file the material holds (its body is a prefix of it)."""
    n = p.body.count("\n")
    return n + 1 if len(p.body) == len(p.full) or p.full[len(p.body)] == "\n" else n


def _trivial(fn) -> bool:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
               for s in body)


def _decorators(fn) -> set[str]:
    out = set()
    for d in fn.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        out.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return out


def _arguments(fn, method: bool) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if (method and "staticmethod" not in _decorators(fn) and names
            and names[0] in ("self", "cls", "mcs", "metacls")):
        names = names[1:]
    names += [x.arg for x in ([a.vararg] if a.vararg else []) + a.kwonlyargs + ([a.kwarg] if a.kwarg else [])]
    return names


def _source_targets(p: Part) -> list[Target]:
    try:
        tree = ast.parse(p.full)
    except (SyntaxError, ValueError):
        return []
    held, starts = _lines_held(p), _line_starts(p.full)
    defs = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.append((None, node))
        if isinstance(node, ast.ClassDef):
            defs += [(node.name, sub) for sub in node.body
                     if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))]
    seen = Counter((cls, n.name) for cls, n in defs)
    out = []
    for cls, node in defs:
        name = node.name
        if seen[(cls, name)] > 1 or (name.startswith("__") and name.endswith("__")):
            continue
        pos = p.start + starts[node.lineno - 1]
        key = (p.label, cls, name)
        if isinstance(node, ast.ClassDef):
            if node.body[0].end_lineno <= held and (len(node.body) >= 2 or ast.get_docstring(node)):
                out.append(Target("class", p.label, name, pos, key,
                                  f"What is the class `{name}` in file {p.label} for? "
                                  "Answer in two sentences."))
            continue
        if (node.end_lineno > held or node.end_lineno - node.lineno < 2 or _trivial(node)
                or "overload" in _decorators(node)):
            continue
        what = f"the function `{name}`" if cls is None else f"the method `{name}` of the class `{cls}`"
        out.append(Target("function", p.label, name, pos, key,
                          f"What does {what} in file {p.label} do? Answer in two sentences."))
        if _arguments(node, cls is not None):
            out.append(Target("arguments", p.label, name, pos, key,
                              f"Which arguments does {what} in file {p.label} take? List them, "
                              "with a few words on each."))
    return out


def _doc_targets(p: Part) -> list[Target]:
    found = headings(p.body)
    count = Counter(t for _, t in found)
    starts = _line_starts(p.body)
    out = []
    for i, title in found:
        after = p.body[starts[min(i + 2, len(starts) - 1)]:] if i + 2 < len(starts) else ""
        if count[title] == 1 and len(after.strip()) >= 80:
            out.append(Target("heading", p.label, title, p.start + starts[i], (p.label, "heading", title),
                              f'What does file {p.label} say under the heading "{title}"? '
                              "Answer in two sentences."))
    return out


def _targets(parts: list[Part]) -> list[Target]:
    out = []
    for p in parts:
        if len(p.body) >= 400:
            out.append(Target("file", p.label, p.label, p.offset, (p.label,),
                              f"Summarise what file {p.label} is for, in two sentences."))
        out += _source_targets(p) if p.kind == "source" else _doc_targets(p)
    return out


def _line_targets(material: str, parts: list[Part]) -> list[Target]:
    """Quoted lines of the text: questions of last resort, for material too short for others."""
    out = []
    for p in parts:
        for start, line in zip(_line_starts(p.body), p.body.split("\n")):
            s = line.strip()
            if (30 <= len(s) <= 100 and not any(c in s for c in '"`') and "://" not in s
                    and len(re.findall(r"[A-Za-z]{2,}", s)) >= 4
                    and material.count(s) == 1):
                out.append(Target("line", p.label, s, p.start + start, (p.label, "line", s),
                                  f'In file {p.label}, what is the passage with the line "{s}" about? '
                                  "Answer in two sentences."))
    return out


def _pick(g: Gen, material: str, parts: list[Part], pkgs) -> list[Target]:
    """One target a turn, the i-th in the i-th of n_q stretches of the material (the nearest
    one left when that stretch has none), kinds in a seeded rotation; asked in a seeded order.
    Material too short for n_q targets (a small context, many turns) gets quoted lines, then
    questions asked again, then (no file at all) a question about the package."""
    main = _targets(parts)
    kinds = list(KINDS)
    g.rng.shuffle(kinds)
    used, chosen, spare = Counter(), [], None
    n = max(1, len(material))
    for i in range(g.n_q):
        lo, hi = i * n / g.n_q, (i + 1) * n / g.n_q
        pool = [t for t in main if t.key not in used and lo <= t.pos < hi]
        pick = None
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            mine = [t for t in pool if t.kind == kind]
            if mine:
                pick = g.rng.choice(mine)
                break
        if pick is None:
            rest = [t for t in main if t.key not in used]
            if not rest:
                spare = spare if spare is not None else _line_targets(material, parts)
                rest = [t for t in spare if t.key not in used] or main + spare
            if not rest:
                names = " and ".join(p.name for p in pkgs)
                rest = [Target("package", "", pkgs[0].name, 0, ("package",),
                               f"What is the Python package {names} for? Answer in two sentences.")]
            mid = (lo + hi) / 2
            pick = min(rest, key=lambda t: (used[t.key], abs(t.pos - mid)))   # the least asked
        used[pick.key] += 1
        chosen.append(pick)
    g.rng.shuffle(chosen)
    return chosen


def package_docs(g: Gen):
    """Files of one installed package of the split; a question a turn about one of its
    functions, classes, documentation sections or files (the first turn carries the files)."""
    pkgs = _choose_packages(g)
    material, parts = _material(g, pkgs)
    chosen = _pick(g, material, parts, pkgs)
    blocks = [Block(material if i == 0 else "", Question(t.text, (), "rouge_full", REPLY_TOKENS))
              for i, t in enumerate(chosen)]
    meta = {"package": pkgs[0].name, "version": pkgs[0].version,
            "packages": [{"name": p.name, "version": p.version} for p in pkgs],
            "files": [p.label for p in parts], "cut": [p.label for p in parts if p.cut],
            "questions": [{"kind": t.kind, "file": t.file, "name": t.name,
                           "depth": round(t.pos / max(1, len(material)), 3)} for t in chosen]}
    return blocks, meta


_EX_FILES = ('Files from the Python package tidy (version 1.0):\n\nFile: tidy/table.py\n\n'
             'def sort_rows(rows, column=0):\n    """Sort the rows of a table in place, by one column '
             '(the first by default)."""\n    rows.sort(key=lambda row: row[column])')
EXAMPLES = ((f"{_EX_FILES}\n\nWhat does the function `sort_rows` in file tidy/table.py do? Answer in two "
             "sentences.", "It sorts the rows of a table in place by one of its columns. Without a column "
             "it sorts by the first one."),)
