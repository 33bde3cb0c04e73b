#!/usr/bin/env python3
"""Build and install the patched llama-cpp-python runtime that loopserve-edge drives.

Steps: fetch the pinned sdist (or read a slim archive made by --write-slim), check its
hash, copy csrc/ (our own C/C++, laid out as in llama.cpp) into its vendor/llama.cpp, apply
patches/*.patch (hunks to upstream files only), add cuda/, build with CMake through
pip (CPU by default, CUDA when asked or when nvcc and a GPU are present) and install into
the Python running this script. Nothing is rebuilt when the installed runtime already
carries the same patch hash and backend.

Standard library only: it runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

ROOT = Path(__file__).resolve().parent.parent
PATCH_DIR = ROOT / "patches"
# Our own C/C++ files, at the paths they take inside vendor/llama.cpp (csrc/src/x.cpp is
# vendor/llama.cpp/src/x.cpp): copied in as they are, never patched.
CSRC_DIR = ROOT / "csrc"
CUDA_DIR = ROOT / "cuda"
LLAMA_DIR = Path("vendor/llama.cpp")
# Where the patches expect our kernels inside the vendored tree.
CUDA_DEST = LLAMA_DIR / "ggml/src/ggml-cuda/loopserve"
BUILD_HEADER = LLAMA_DIR / "src/llama-loopserve-build.h"

# Trees of the sdist the runtime build never reads: dropped from the slim archive.
SLIM_DROP = [
    ".git", "docs", "examples", "docker", "tests", "scripts",
    "vendor/llama.cpp/.devops", "vendor/llama.cpp/.github",
    "vendor/llama.cpp/docs", "vendor/llama.cpp/models", "vendor/llama.cpp/media",
    "vendor/llama.cpp/examples", "vendor/llama.cpp/tools", "vendor/llama.cpp/benches",
    "vendor/llama.cpp/gguf-py", "vendor/llama.cpp/conversion", "vendor/llama.cpp/app",
    "vendor/llama.cpp/pocs", "vendor/llama.cpp/skills", "vendor/llama.cpp/requirements",
    "vendor/llama.cpp/scripts", "vendor/llama.cpp/ci",
]
# Backends kept in the slim archive; every other ggml/src/ggml-* directory is dropped.
SLIM_KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda"}

CMAKE_COMMON = [
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]

# Compiler flags for every build. The CPU backend is built for the building machine
# (GGML_NATIVE), but without Intel AMX: some sandboxes report AMX and grant its
# permission, then fault on the first tile instruction (seen on this project's dev
# machines), and AMX only speeds up batched matmuls of a few quant types on server CPUs.
# Nor AVX512-FP16: with it ggml's f16 vector functions (flash attention's dot and
# accumulate) go 128 values a step and leave the rest to a scalar loop, so a head dim of 64
# never leaves that loop (flash attention then took half of a 16-client CPU server's time on
# the default model); without it they go 64 a step through F16C conversions, in f32.
NATIVE_EXTRA = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -mno-avx512fp16"


def accepted_flags(flags: str) -> str:
    """The flags the C compiler knows: gcc before 12 has no -mno-avx512fp16 (nor emits
    AVX512-FP16, so there is nothing to turn off)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return flags
    ok = [f for f in flags.split()
          if subprocess.run([cc, f, "-E", "-x", "c", "-"], input="", capture_output=True, text=True).returncode == 0]
    return " ".join(ok)


HOST_FLAGS = accepted_flags(NATIVE_EXTRA) if platform.machine().lower() in ("x86_64", "amd64") else ""

T0 = time.monotonic()


def log(msg: str) -> None:
    el = int(time.monotonic() - T0)
    print(f"[build {el // 60:02d}:{el % 60:02d}] {msg}", flush=True)


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"build_runtime: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def build_inputs() -> list[Path]:
    """Every file of ours that goes into the build: patches, csrc/ and cuda/."""
    files = sorted(PATCH_DIR.glob("*.patch"))
    for d in (CSRC_DIR, CUDA_DIR):
        if d.is_dir():
            files += sorted(p for p in d.rglob("*") if p.is_file())
    return files


def patch_hash() -> str:
    """Hash of everything we add to upstream (the files of build_inputs, with their paths,
    and the build flags): the runtime is current iff this matches."""
    flags = " ".join(CMAKE_COMMON)
    h = hashlib.sha256(f"{PACKAGE}=={VERSION}\n{HOST_FLAGS}\n{flags}\n".encode())
    files = build_inputs()
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def installed_runtime(python: str) -> tuple[str, str] | None:
    """(patch hash, backend) of the runtime importable by `python`, or None."""
    probe = (
        "import ctypes, llama_cpp.llama_cpp as m; lib = m._lib\n"
        "f = getattr(lib, 'llama_loopserve_patch_hash', None)\n"
        "if f is None: print('unpatched')\n"
        "else:\n"
        "  f.restype = ctypes.c_char_p\n"
        "  print(f().decode(), 'cuda' if m.llama_supports_gpu_offload() else 'cpu')\n"
    )
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.strip() in ("", "unpatched"):
        return None
    h, backend = r.stdout.split()
    return h, backend


def want_cuda(arg: str) -> bool:
    if arg in ("on", "off"):
        return arg == "on"
    env = os.environ.get("LOOPSERVE_CUDA", "").lower()
    if env in ("1", "on", "true", "yes"):
        return True
    if env in ("0", "off", "false", "no"):
        return False
    # auto: a CUDA compiler and a visible GPU
    if shutil.which("nvcc") is None:
        return False
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    sdist = cache / f"{SDIST_NAME}.tar.gz"
    if not sdist.exists():
        log(f"downloading {PACKAGE}=={VERSION} sdist from the package index")
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", "-q", "-d", str(cache), f"{PACKAGE}=={VERSION}"],
        )
        if r.returncode != 0 or not sdist.exists():
            fail(f"could not download {PACKAGE}=={VERSION}; offline? use --source ARCHIVE "
                 "with an archive made by --write-slim")
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        sdist.unlink()
        fail(f"{sdist.name} has sha256 {digest}, expected {SDIST_SHA256}; removed it")
    log(f"sdist hash ok ({sdist.name})")
    return sdist


def extract(archive: Path, dest: Path) -> Path:
    """Extract and return the top directory (the sdist root)."""
    with tarfile.open(archive) as tf:
        # the "data" filter where this Python has it (3.11.4+, 3.10.12+); the archive is
        # the hash-checked sdist or our own slim copy of it either way
        tf.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1:
        fail(f"{archive} does not hold one top directory")
    return tops[0]


def slim_keeps(rel: str, is_dir: bool) -> bool:
    """True if the slim archive keeps path `rel` (relative to the sdist root)."""
    if any(rel == d or rel.startswith(d + "/") for d in SLIM_DROP):
        return False
    parts = rel.split("/")
    if parts[:4] == ["vendor", "llama.cpp", "ggml", "src"] and len(parts) > 4:
        backend_dir = len(parts) > 5 or is_dir
        if backend_dir and parts[4].startswith("ggml-") and parts[4] not in SLIM_KEEP_BACKENDS:
            return False
    return True


def write_slim(sdist: Path, out: Path) -> None:
    """Slim source archive: the pinned sdist less docs, models and other backends."""
    with tempfile.TemporaryDirectory() as tmp:
        top = extract(sdist, Path(tmp))
        (top / "LOOPSERVE_SLIM").write_text(f"{SDIST_NAME}.tar.gz sha256 {SDIST_SHA256}\n")
        with tarfile.open(out, "w:gz", compresslevel=9) as tf:
            tf.add(top, arcname=SDIST_NAME,
                   filter=lambda ti: ti if slim_keeps(
                       ti.name[len(SDIST_NAME) + 1:], ti.isdir()) else None)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def add_sources(tree: Path) -> None:
    """Copy csrc/ into the vendored llama.cpp. Each file must be new there: csrc/ adds
    files, only patches/ change upstream ones."""
    llama = tree / LLAMA_DIR
    files = [p for p in sorted(CSRC_DIR.rglob("*")) if p.is_file()] if CSRC_DIR.is_dir() else []
    clash = [str(p.relative_to(CSRC_DIR)) for p in files if (llama / p.relative_to(CSRC_DIR)).exists()]
    if clash:
        fail(f"csrc/ would overwrite upstream files: {', '.join(clash)} (change them with a patch)")
    for p in files:
        dest = llama / p.relative_to(CSRC_DIR)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
    log(f"added csrc/ ({len(files)} files) to {LLAMA_DIR}")


def apply_patches(tree: Path, digest: str) -> None:
    llama = tree / LLAMA_DIR
    add_sources(tree)
    for p in sorted(PATCH_DIR.glob("*.patch")):
        r = subprocess.run(
            ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-s",
             "-d", str(llama), "-i", str(p)],
            capture_output=True, text=True,
        )
        if r.returncode != 0:
            fail(f"{p.name} does not apply to {SDIST_NAME}:\n{r.stdout}{r.stderr}")
        log(f"applied {p.name}")
    if CUDA_DIR.is_dir() and any(CUDA_DIR.iterdir()):
        shutil.copytree(CUDA_DIR, tree / CUDA_DEST, dirs_exist_ok=True)
        log(f"added cuda/ as {CUDA_DEST}")
    (tree / BUILD_HEADER).write_text(
        "#pragma once\n"
        f"#define LLAMA_LOOPSERVE_PATCH_HASH \"{digest}\"\n"
    )


def sync_tree(src: Path, dst: Path) -> None:
    """Make dst equal src, rewriting only files whose bytes differ, so that CMake's
    incremental build recompiles what a patch changed and nothing else."""
    dst.mkdir(parents=True, exist_ok=True)
    seen = set()
    for s in src.rglob("*"):
        rel = s.relative_to(src)
        seen.add(rel)
        d = dst / rel
        if s.is_dir():
            d.mkdir(exist_ok=True)
        elif not d.exists() or d.stat().st_size != s.stat().st_size or d.read_bytes() != s.read_bytes():
            shutil.copy2(s, d)
            os.utime(d)
    for d in sorted(dst.rglob("*"), reverse=True):
        if d.relative_to(dst) not in seen:
            shutil.rmtree(d) if d.is_dir() else d.unlink()


def build(tree: Path, build_dir: Path, cuda: bool, jobs: int | None, cuda_arch: str,
          target: Path | None = None) -> None:
    """pip-install `tree` into this Python, or into the folder `target` (pip --target)."""
    args = list(CMAKE_COMMON)
    if cuda:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    env = dict(os.environ, CMAKE_ARGS=" ".join(args))
    if jobs:
        env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
    # --config-settings, not its short form -C: pip only has that from 23.1 (Debian 12's venvs
    # come with 23.0.1)
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
           "--force-reinstall", f"--config-settings=build-dir={build_dir}",
           "--config-settings=cmake.verbose=false", "--config-settings=build.verbose=false", str(tree)]
    if target is not None:
        cmd[-1:-1] = ["--target", str(target), "--upgrade"]
    if HOST_FLAGS:  # a config setting, not CMAKE_ARGS: the value holds spaces
        cmd[-1:-1] = [f"--config-settings=cmake.define.CMAKE_{lang}_FLAGS={HOST_FLAGS}" for lang in ("C", "CXX")]
    log(f"building {'CUDA (' + cuda_arch + ')' if cuda else 'CPU'} runtime in {build_dir}")
    tail: list[str] = []
    step = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")
    last = 0.0
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line])[-60:]
            m = step.match(line)
            now = time.monotonic()
            if m and (now - last > 5 or m.group(1) == m.group(2)):
                last = now
                what = re.sub(r"^.*?(Building|Linking)", r"\1", m.group(3))[:90]
                log(f"[{m.group(1)}/{m.group(2)}] {what}")
            elif line.startswith(("CMake Error", "error:", "ERROR")):
                log(line.rstrip())
        rc = proc.wait()
    if rc != 0:
        sys.stderr.write("".join(tail))
        fail(f"the runtime build failed (exit {rc}); the last lines are above")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cuda", choices=["auto", "on", "off"], default="auto",
                    help="CUDA backend: auto = when nvcc and a GPU are present "
                         "(env LOOPSERVE_CUDA=1/0 decides under auto)")
    ap.add_argument("--cuda-arch", default=os.environ.get("LOOPSERVE_CUDA_ARCH", "native"),
                    help="CMAKE_CUDA_ARCHITECTURES (default: native)")
    ap.add_argument("--source", type=Path, help="build offline from this archive "
                    "(an sdist or a slim archive made by --write-slim)")
    ap.add_argument("--write-slim", type=Path, metavar="OUT",
                    help="write a slim source archive to OUT and exit")
    ap.add_argument("--build-dir", type=Path,
                    default=Path(os.environ.get("LOOPSERVE_BUILD_DIR", ROOT / "build")))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="rebuild even if current")
    ap.add_argument("--check", action="store_true",
                    help="exit 0 if the installed runtime is current, 1 if not")
    ap.add_argument("--unpatched", type=Path, metavar="DIR",
                    help="build the same sdist without our patches, sources and kernels, with the same "
                         "options, into DIR (put it first on PYTHONPATH): the baseline of "
                         "benchmarks/overhead.py; the installed runtime is left as it is")
    a = ap.parse_args()

    digest = patch_hash()
    cuda = want_cuda(a.cuda)
    backend = "cuda" if cuda else "cpu"
    if a.write_slim:
        write_slim(a.source or fetch_sdist(a.build_dir / "downloads"), a.write_slim)
        return
    if a.unpatched:
        source = a.source or fetch_sdist(a.build_dir / "downloads")
        a.unpatched.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=a.build_dir if a.build_dir.exists() else None) as tmp:
            log(f"unpacking {source.name} (no patches)")
            staged = extract(source, Path(tmp))
            build(staged, a.build_dir / f"cmake-{backend}-unpatched", cuda, a.jobs, a.cuda_arch,
                  target=a.unpatched.resolve())
        log(f"installed the unpatched {VERSION} ({backend}) into {a.unpatched}")
        return
    have = installed_runtime(sys.executable)
    current = have == (digest, backend)
    if a.check:
        print(f"installed: {have}, wanted: ({digest}, {backend})")
        sys.exit(0 if current else 1)
    if current and not a.force:
        log(f"runtime current (patch hash {digest}, {backend}): nothing to build")
        return

    source = a.source or fetch_sdist(a.build_dir / "downloads")
    with tempfile.TemporaryDirectory(dir=a.build_dir if a.build_dir.exists() else None) as tmp:
        log(f"unpacking {source.name}")
        staged = extract(source, Path(tmp))
        apply_patches(staged, digest)
        sync_tree(staged, a.build_dir / "src")
    build(a.build_dir / "src", a.build_dir / f"cmake-{backend}", cuda, a.jobs, a.cuda_arch)
    have = installed_runtime(sys.executable)
    if have is None or have[0] != digest:
        fail(f"the installed runtime reports {have}, expected patch hash {digest}")
    log(f"installed patched runtime {VERSION} (patch hash {digest}, {have[1]})")


if __name__ == "__main__":
    main()
