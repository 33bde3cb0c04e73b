"""Real long texts for the benchmark beyond the shared data: the documentation and source
files of Python packages installed in the running environment, read in place.

A package gives its description (the README that its distribution's METADATA carries,
listed as `<name>/README.md` or `.rst`), the .rst/.md/.txt documentation files it ships
and its .py modules. Licences, tests and vendored copies of other packages are left out.
The packages are split, by name, into two disjoint fixed lists: tuning runs (`dev`) read
only the first, reported runs (`test`) only the second. A split uses those of its packages
that are installed; the texts are a function of the installed versions (recorded with
every case) and never of directory order.
"""
from __future__ import annotations

import functools
import importlib.metadata as metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import LoopServeError

# Packages that scripts/setup.sh installs or that come with them, by distribution name.
# Each list holds packages the GPU box has as well (numpy, click, jinja2, matplotlib,
# pyparsing, packaging, psutil, pytest, setuptools, python-dateutil).
SPLIT_PACKAGES: dict[str, tuple[str, ...]] = {
    "dev": ("click", "jinja2", "packaging", "psutil", "pytest", "markupsafe", "platformdirs",
            "pluggy", "iniconfig"),
    "test": ("numpy", "matplotlib", "pyparsing", "setuptools", "python-dateutil", "diskcache",
             "typing_extensions", "gguf"),
}
SOURCE_SUFFIXES = (".py",)
DOC_SUFFIXES = (".rst", ".md", ".txt")
# folders whose files are not the package's own text: tests, vendored packages, caches
SKIP_DIRS = frozenset({"tests", "test", "_vendor", "vendor", "_vendored", "extern", "__pycache__"})
SKIP_DOC_NAMES = ("license", "licence", "copying", "notice", "authors", "copyright",
                  "cmakelists", "requirements", "top_level", "entry_points")
MIN_CHARS = 400       # smaller files (bare __init__.py files) are passed over


class PackagesMissingError(LoopServeError, ValueError):
    """None of a split's packages is installed (the CLI prints it as one line)."""


@dataclass(frozen=True)
class PackageFile:
    label: str           # "click/core.py"; the description: "click/README.md"
    kind: str            # "source" or "docs"
    path: str | None     # where it is read from; None: the description in METADATA
    size: int            # characters (bytes for files on disk), for size estimates


@dataclass(frozen=True)
class Package:
    name: str            # distribution name, as in SPLIT_PACKAGES
    version: str
    files: tuple[PackageFile, ...]   # sorted by label; the description first when there is one

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def normalize(text: str) -> str:
    """One newline convention, no trailing white space, no leading or trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


_MD_BADGE = re.compile(r"\[!\[[^\]\n]*\]\([^)\s]*\)\]\(\s*[^)\s]*\)|!\[[^\]\n]*\]\([^)\s]*\)")
_RST_IMAGE = re.compile(r"^\.\. (\|[^|]+\| )?(image|figure)::")
_RST_SUBSTITUTIONS = re.compile(r"[|\s]*(\|[^|\s][^|]*\|[|\s]*)*")
_TAG = re.compile(r"<[^>]+>")


def strip_badges(text: str) -> str:
    """A README without its badges and pictures, which say nothing in text: Markdown image
    links, HTML lines of tags only, reST image directives (with their options) and lines of
    substitution references only (|pypi| |licence|). Everything else is kept as it is."""
    text = _MD_BADGE.sub("", text)
    out, in_image = [], False
    for line in text.split("\n"):
        if in_image and line[:1].isspace() and line.strip():
            continue
        in_image = bool(_RST_IMAGE.match(line))
        s = line.strip()
        if in_image or (s and ("|" in s and _RST_SUBSTITUTIONS.fullmatch(s)
                                or "<" in s and not _TAG.sub("", s).strip())):
            continue
        out.append(line)
    text = re.sub(r"\n{3,}", "\n\n", normalize("\n".join(out)))
    return re.sub(r"\A(?:([-=~^*+#_.:])\1{2,}\n+)+", "", text)   # a transition left on top


def _description(dist) -> str:
    """The long description (the METADATA body, or the old-style Description field),
    without its badges."""
    md = dist.metadata
    body = md.get_payload() if hasattr(md, "get_payload") else None
    if isinstance(body, str) and body.strip():
        return strip_badges(normalize(body))
    desc = md.get("Description") or ""
    if not desc.strip() or desc.strip() == "UNKNOWN":
        return ""
    first, *rest = desc.split("\n")
    rest = [line[8:] if line.startswith(" " * 8) else line.lstrip() for line in rest]
    return strip_badges(normalize("\n".join([first] + [line[1:] if line.startswith("|") else line
                                                         for line in rest])))


def _wanted(rel: PurePosixPath) -> str | None:
    """'source', 'docs' or None for a file path relative to site-packages."""
    parts = rel.parts
    if ".." in parts or any(p.endswith((".dist-info", ".egg-info")) or p in SKIP_DIRS for p in parts[:-1]):
        return None
    if rel.suffix in SOURCE_SUFFIXES:
        return "source"
    if rel.suffix in DOC_SUFFIXES and not rel.name.lower().startswith(SKIP_DOC_NAMES):
        return "docs"
    return None


def _listed_files(dist, name: str) -> list[tuple[str, Path]]:
    """(relative posix path, location) of the distribution's files, from its RECORD, or,
    without one, by walking its import package (sorted, never in directory order)."""
    if dist.files is not None:
        return [(PurePosixPath(str(f)).as_posix(), Path(dist.locate_file(f))) for f in dist.files]
    tops = (dist.read_text("top_level.txt") or name.replace("-", "_")).split()
    out = []
    for top in sorted(set(tops)):
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        roots = list(spec.submodule_search_locations or [])
        if not roots and spec.origin and spec.origin.endswith(".py"):
            out.append((Path(spec.origin).name, Path(spec.origin)))
        for root in roots:
            root = Path(root)
            for dirpath, dirs, files in os.walk(root):
                dirs.sort()
                for f in sorted(files):
                    p = Path(dirpath) / f
                    out.append(((PurePosixPath(top) / p.relative_to(root).as_posix()).as_posix(), p))
    return out


@functools.lru_cache(maxsize=None)
def find_package(name: str) -> Package | None:
    """The installed distribution `name` and its texts, or None when it is not installed."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    files: dict[str, PackageFile] = {}
    for rel, loc in _listed_files(dist, name):
        kind = _wanted(PurePosixPath(rel))
        if kind is None or rel in files:
            continue
        try:
            size = loc.stat().st_size if loc.is_file() else 0
        except OSError:
            continue
        if size >= MIN_CHARS:
            files[rel] = PackageFile(rel, kind, str(loc), size)
    readme = _description(dist)
    ext = ".md" if "markdown" in (dist.metadata.get("Description-Content-Type") or "") else ".rst"
    label = f"{name}/README{ext}"
    head = ([PackageFile(label, "docs", None, len(readme))]
            if len(readme) >= MIN_CHARS and label not in files else [])
    return Package(name, dist.version, tuple(head + [files[k] for k in sorted(files)]))


def split_packages(split: str) -> tuple[Package, ...]:
    """The installed packages of a split, in the split's fixed order."""
    if split not in SPLIT_PACKAGES:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLIT_PACKAGES)}")
    names = SPLIT_PACKAGES[split]
    found = tuple(p for p in map(find_package, names) if p is not None and p.files)
    if not found:
        raise PackagesMissingError(
            f"package_docs: none of the {split} split's packages is installed (looked for "
            f"{', '.join(names)}); install one of them (scripts/setup.sh installs several)")
    return found


@functools.lru_cache(maxsize=256)
def read_text(package: str, f: PackageFile) -> str:
    """The text of a file of `package`, normalised (see `normalize`); "" for a file that
    is not text."""
    if f.path is None:
        return _description(metadata.distribution(package))
    try:
        raw = Path(f.path).read_bytes()
    except OSError:
        return ""
    if b"\x00" in raw:
        return ""
    return normalize(raw.decode("utf-8", errors="replace"))
