"""The installed llama-cpp-python is the patched runtime this checkout builds."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build_script():
    spec = importlib.util.spec_from_file_location("build_runtime", ROOT / "scripts/build_runtime.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_installed_runtime_carries_this_patch_set():
    from loopserve_edge import runtime_info

    info = runtime_info()
    assert info["patch_hash"] == _build_script().patch_hash()
    assert info["llama_cpp_python"] == "0.3.36"
    assert info["backend"] in ("CPU", "CUDA")


def test_build_is_skipped_when_current():
    from loopserve_edge import runtime_info

    cuda = "on" if runtime_info()["backend"] == "CUDA" else "off"
    cmd = [sys.executable, str(ROOT / "scripts/build_runtime.py"), "--cuda", cuda]
    # --check first: on a stale runtime the plain command would start a real build
    check = subprocess.run(cmd + ["--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"the installed runtime is not current: {check.stdout}"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "nothing to build" in r.stdout


def test_patch_hash_changes_with_patches(tmp_path, monkeypatch):
    mod = _build_script()
    before = mod.patch_hash()
    extra = tmp_path / "patches"
    extra.mkdir()
    for p in (ROOT / "patches").glob("*.patch"):
        (extra / p.name).write_bytes(p.read_bytes() + b"\n")
    monkeypatch.setattr(mod, "PATCH_DIR", extra)
    monkeypatch.setattr(mod, "CUDA_DIR", tmp_path / "cuda")  # hashed too; paths relative to ROOT
    if (ROOT / "cuda").is_dir():
        shutil.copytree(ROOT / "cuda", tmp_path / "cuda")
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    assert mod.patch_hash() != before


def test_slim_archive_keeps_build_inputs_and_drops_the_rest():
    keeps = _build_script().slim_keeps
    assert keeps("vendor/llama.cpp/src/llama-graph.cpp", False)
    assert keeps("vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu", False)
    assert keeps("vendor/llama.cpp/ggml/src/ggml-cpu", True)
    assert keeps("vendor/llama.cpp/ggml/src/ggml-alloc.c", False)
    assert not keeps("vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp", False)
    assert not keeps("vendor/llama.cpp/ggml/src/ggml-metal", True)
    assert not keeps("vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf", False)
    assert not keeps("vendor/llama.cpp/docs/build.md", False)


def test_unpatched_runtime_gives_a_clear_error():
    # A stock libllama lacks the llama_loopserve_ symbols: stand in libc for it.
    code = (
        "import ctypes, ctypes.util, llama_cpp.llama_cpp as m\n"
        "m._lib = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "try:\n"
        "    import loopserve_edge\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("RuntimeBuildError"), r.stdout + r.stderr
    assert "llama_loopserve_api_version" in r.stdout
    assert "setup.sh" in r.stdout
