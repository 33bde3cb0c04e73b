#!/usr/bin/env python3
"""A built runtime carried from one GPU-box lease to the next (benchmarks/device_run.sh).

The box is given back 30 s after a call and each fresh one builds the CUDA runtime again
(~5 of a session's 30 device minutes). `pack` writes the installed runtime, current for
this checkout, as xz parts of at most 15 MiB named by its patch hash and backend
(runtime-HASH-BACKEND.tar.xz.partN: what the device tool brings back); `install` puts such
parts into a folder on PYTHONPATH, only when their hash and backend are this checkout's, and
checks that the runtime imported from there reports them. Anything else (no parts, another
hash, a part missing or cut) leaves the folder without a runtime and exits 1: build instead.

  carried_runtime.py pack OUT_DIR [--cuda on|off|auto]
  carried_runtime.py install CARRIED_DIR SITE_DIR [--cuda on|off|auto]

Standard library only, like build_runtime.py, whose hash and probe it uses.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_runtime import installed_runtime, patch_hash, want_cuda  # noqa: E402

PART_BYTES = 15 << 20  # the device tool brings back files of up to 16 MiB


def part_name(digest: str, backend: str) -> str:
    return f"runtime-{digest}-{backend}.tar.xz.part"


def package_dir() -> Path:
    r = subprocess.run([sys.executable, "-c", "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("carried_runtime: error: no importable llama_cpp to pack")
    return Path(r.stdout.strip())


def pack(out: Path, digest: str, backend: str) -> list[Path]:
    have = installed_runtime(sys.executable)
    if have != (digest, backend):
        sys.exit(f"carried_runtime: error: the installed runtime is {have}, not ({digest}, {backend}): build first")
    pkg = package_dir()
    buf = io.BytesIO()
    # pip installs each library three times (name, soname, versioned name) as copies: the
    # second and third go in as links to the first, or the parts would triple
    seen: dict[tuple[Path, str], str] = {}
    with tarfile.open(fileobj=buf, mode="w:xz", preset=6) as tar:
        for p in sorted(pkg.rglob("*")):
            if "__pycache__" in p.parts or not p.is_file():
                continue
            arc = str(Path(pkg.name) / p.relative_to(pkg))
            key = (p.parent, hashlib.sha256(p.read_bytes()).hexdigest())
            if key in seen and not p.is_symlink():
                info = tarfile.TarInfo(arc)
                info.type, info.linkname = tarfile.SYMTYPE, seen[key]
                tar.addfile(info)
                continue
            seen.setdefault(key, p.name)
            tar.add(p, arc, recursive=False)
    data = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(part_name(digest, backend) + "*"):
        old.unlink()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        parts.append(out / f"{part_name(digest, backend)}{i // PART_BYTES}")
        parts[-1].write_bytes(data[i:i + PART_BYTES])
    print(f"packed {pkg} (patch hash {digest}, {backend}) into {len(parts)} part(s), "
          f"{len(data) / 2**20:.1f} MiB", flush=True)
    return parts


def install(carried: Path, site: Path, digest: str, backend: str) -> bool:
    # a runtime left in SITE would shadow the one a build installs after a refusal
    target = site / "llama_cpp"
    shutil.rmtree(target, ignore_errors=True)
    name = part_name(digest, backend)
    parts = sorted((p for p in carried.glob(name + "*") if p.name[len(name):].isdigit()),
                   key=lambda p: int(p.name[len(name):]))
    if not parts or [p.name[len(name):] for p in parts] != [str(i) for i in range(len(parts))]:
        others = sorted(p.name for p in carried.glob("runtime-*"))
        print(f"no carried runtime for patch hash {digest} ({backend})"
              + (f"; carried: {', '.join(others)}" if others else ""), flush=True)
        return False
    site.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            joined = Path(tmp) / "runtime.tar.xz"
            with joined.open("wb") as f:
                for p in parts:
                    f.write(p.read_bytes())
            with tarfile.open(joined, mode="r:xz") as tar:
                for m in tar.getmembers():
                    if (not m.name.startswith("llama_cpp/") or ".." in Path(m.name).parts
                            or (m.issym() and "/" in m.linkname) or not (m.isfile() or m.issym() or m.isdir())):
                        raise tarfile.TarError(f"unexpected member {m.name}")
                # Python's "data" filter where it has one (3.11.4 and later)
                tar.extractall(site, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
        shutil.rmtree(target, ignore_errors=True)
        print(f"the carried runtime could not be read ({e}): not installed", flush=True)
        return False
    # the probe imports what the box's steps will import: SITE first on the path
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    have = installed_runtime(sys.executable)
    if have != (digest, backend):
        shutil.rmtree(target, ignore_errors=True)
        print(f"the carried runtime reports {have}, not ({digest}, {backend}): not installed", flush=True)
        return False
    print(f"installed the carried runtime (patch hash {digest}, {backend}) into {site}", flush=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="the installed runtime as parts into OUT_DIR")
    p.add_argument("out", type=Path)
    i = sub.add_parser("install", help="parts from CARRIED_DIR into SITE_DIR, if they are this checkout's")
    i.add_argument("carried", type=Path)
    i.add_argument("site", type=Path)
    for s in (p, i):
        s.add_argument("--cuda", choices=["auto", "on", "off"], default="auto")
    a = ap.parse_args()
    digest, backend = patch_hash(), "cuda" if want_cuda(a.cuda) else "cpu"
    if a.cmd == "pack":
        pack(a.out, digest, backend)
    else:
        sys.exit(0 if install(a.carried, a.site, digest, backend) else 1)


if __name__ == "__main__":
    main()
