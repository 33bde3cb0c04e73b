"""Our sources keep their shape: the C/C++ of csrc/ is formatted with llama.cpp's own
.clang-format (from the pinned sdist, as the build unpacked it into build/src), and the
Python package imports in one direction only (no import circles)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STYLE = ROOT / "build/src/vendor/llama.cpp/.clang-format"
CLANG_FORMAT_VERSION = "18.1.8"  # pinned in scripts/setup.sh: another version formats otherwise
CSRC = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".c", ".cpp", ".h"))


def clang_format() -> str:
    exe = shutil.which("clang-format", path=str(Path(sys.executable).parent)) or shutil.which("clang-format")
    assert exe, f"clang-format {CLANG_FORMAT_VERSION} is not installed (./scripts/setup.sh installs it)"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    assert CLANG_FORMAT_VERSION in out, f"{exe} is {out.strip()}, the sources are formatted with {CLANG_FORMAT_VERSION}"
    return exe


def unformatted(files: list[Path]) -> str:
    r = subprocess.run([clang_format(), f"--style=file:{STYLE}", "--dry-run", "-Werror", *map(str, files)],
                       capture_output=True, text=True)
    return r.stderr if r.returncode else ""


needs_style = pytest.mark.skipif(not STYLE.exists(), reason="no unpacked sdist (run scripts/build_runtime.py)")


@needs_style
def test_csrc_is_formatted_with_llama_cpp_style():
    assert CSRC, "csrc/ has no C/C++ files"
    bad = unformatted(CSRC)
    assert not bad, f"run scripts/format.sh; clang-format would change:\n{bad[:3000]}"


@needs_style
def test_the_format_check_catches_a_misformatted_file(tmp_path):
    src = CSRC[0].read_text().replace("    ", "  ", 3)
    bad = tmp_path / CSRC[0].name
    bad.write_text(src)
    assert unformatted([bad])


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at any level of the file (type-only and
    function-level imports count: a circle is a circle wherever it is written)."""
    pkg = ROOT / "loopserve_edge"
    graph: dict[str, set[str]] = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mod = ".".join(parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = parts if is_pkg else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                deps.update(f"{target}.{a.name}" for a in node.names) if node.module is None else deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("loopserve_edge"))
        graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_package_has_no_import_circles():
    graph = _import_graph()
    assert "loopserve_edge.llama" in graph and "loopserve_edge.context" in graph["loopserve_edge.llama"]
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
