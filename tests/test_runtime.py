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


@pytest.mark.parametrize("change", ["patch", "csrc", "cuda", "new csrc file", "cmake flags"])
def test_patch_hash_covers_every_build_input(tmp_path, monkeypatch, change):
    mod = _build_script()
    before = mod.patch_hash()
    for d in ("patches", "csrc", "cuda"):
        shutil.copytree(ROOT / d, tmp_path / d)
    monkeypatch.setattr(mod, "ROOT", tmp_path)  # inputs are hashed with their paths under ROOT
    for name, d in (("PATCH_DIR", "patches"), ("CSRC_DIR", "csrc"), ("CUDA_DIR", "cuda")):
        monkeypatch.setattr(mod, name, tmp_path / d)
    assert mod.patch_hash() == before  # the same files elsewhere: the same hash
    if change == "cmake flags":
        monkeypatch.setattr(mod, "CMAKE_COMMON", mod.CMAKE_COMMON + ["-DGGML_NATIVE=OFF"])
    elif change == "new csrc file":
        (tmp_path / "csrc/src/llama-loopserve-new.cpp").write_text("// new\n")
    else:
        folder, pattern = {"patch": ("patches", "*.patch"), "csrc": ("csrc", "**/*.cpp"),
                           "cuda": ("cuda", "*.cu")}[change]
        f = sorted((tmp_path / folder).glob(pattern))[0]
        f.write_bytes(f.read_bytes() + b"\n")
    assert mod.patch_hash() != before


def test_csrc_adds_files_and_patches_only_touch_upstream():
    """csrc/ holds files llama.cpp does not have; no patch creates a file (every hunk's
    source side is an upstream file), and none touches a file of csrc/."""
    mod = _build_script()
    ours = {str(p.relative_to(mod.CSRC_DIR)) for p in mod.CSRC_DIR.rglob("*") if p.is_file()}
    assert ours, "csrc/ is empty"
    for patch in sorted(mod.PATCH_DIR.glob("*.patch")):
        lines = patch.read_text().splitlines()
        assert not lines[0].startswith(("---", "diff")), f"{patch.name} has no header"
        targets = [l[4:].split("\t")[0] for l in lines if l.startswith("--- ")]
        assert targets, f"{patch.name} has no hunks"
        for t in targets:
            assert t.startswith("a/") and t != "/dev/null", f"{patch.name}: {t} is not an upstream file"
            assert t[2:] not in ours, f"{patch.name} patches {t[2:]}, which is ours (csrc/)"
        assert "@@ -0,0 " not in patch.read_text(), f"{patch.name} creates a file"


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


# -- a built runtime carried between GPU-box leases (scripts/carried_runtime.py) ----------

CARRIED = ROOT / "scripts/carried_runtime.py"


def _carried(*args):
    import os

    e = dict(os.environ)
    e.pop("PYTHONPATH", None)  # the site under test is the only one added
    return subprocess.run([sys.executable, str(CARRIED), *map(str, args), "--cuda", _backend_arg()],
                          capture_output=True, text=True, timeout=300, env=e)


def _backend_arg():
    from loopserve_edge import runtime_info

    return "on" if runtime_info()["backend"] == "CUDA" else "off"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    r = _carried("pack", out)
    assert r.returncode == 0, r.stderr
    parts = sorted(out.iterdir())
    backend = "cuda" if _backend_arg() == "on" else "cpu"
    assert [p.name for p in parts] == [f"runtime-{_build_script().patch_hash()}-{backend}.tar.xz.part{i}"
                                       for i in range(len(parts))]
    assert all(p.stat().st_size <= 15 << 20 for p in parts)
    return out, parts


def test_carried_runtime_installs_and_is_what_imports(packed, tmp_path):
    out, _ = packed
    site = tmp_path / "site"
    r = _carried("install", out, site)
    assert r.returncode == 0, r.stdout + r.stderr
    lib = site / "llama_cpp/lib"
    # pip's three copies of each library came as one file and two links
    assert any(p.is_symlink() for p in lib.iterdir()) and any(not p.is_symlink() for p in lib.iterdir())
    code = "import llama_cpp, loopserve_edge as le; print(llama_cpp.__file__); print(le.runtime_info()['patch_hash'])"
    import os

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}"))
    assert r.returncode == 0, r.stderr
    where, digest = r.stdout.split()
    assert Path(where).is_relative_to(site) and digest == _build_script().patch_hash()


@pytest.mark.parametrize("damage", ["other hash", "cut", "first part missing"])
def test_carried_runtime_is_refused_unless_whole_and_current(packed, tmp_path, damage):
    _, parts = packed
    carried = tmp_path / "carried"
    carried.mkdir()
    for p in parts:
        shutil.copy(p, carried / p.name)
    first = carried / parts[0].name
    if damage == "other hash":
        for p in carried.iterdir():
            p.rename(carried / p.name.replace(_build_script().patch_hash(), "0" * 16))
    elif damage == "cut":
        last = carried / parts[-1].name
        last.write_bytes(last.read_bytes()[:-4096])
    else:
        first.rename(carried / (first.name[:-1] + "9"))
    site = tmp_path / "site"
    (site / "llama_cpp").mkdir(parents=True)  # a runtime left there before is not kept either
    r = _carried("install", carried, site)
    assert r.returncode == 1
    assert not (site / "llama_cpp").exists()
    assert ("no carried runtime" if damage != "cut" else "could not be read") in r.stdout


def test_pack_refuses_a_runtime_not_of_these_sources(tmp_path):
    spec = importlib.util.spec_from_file_location("carried_runtime", CARRIED)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match="build first"):
        mod.pack(tmp_path, "0" * 16, "cpu")
    assert not any(tmp_path.iterdir())
