"""The cuda/ kernels compile (nvcc, compile only) against the patched ggml-cuda headers,
for sm_90a and a consumer arch (sm_86), without building the rest of ggml-cuda. CI has
nvcc but no GPU; a kernel that does not build can never land. Skipped without nvcc or
without a patched source tree (scripts/build_runtime.py writes build/src)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build/src/vendor/llama.cpp"
CUDA = ROOT / "cuda"
STUB = Path(__file__).parent / "cuda_stub"  # cublas_v2.h, when the toolkit lacks cuBLAS


def nvcc() -> str | None:
    return shutil.which("nvcc")


def cublas_include() -> bool:
    out = subprocess.run([nvcc(), "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    return any((Path(p[2:].strip('"')) / "cublas_v2.h").exists()
               for line in out.splitlines() for p in line.split() if p.startswith("-I"))


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found")
@pytest.mark.skipif(not (TREE / "ggml/src/ggml-cuda/common.cuh").exists(),
                    reason="no patched source tree (run scripts/build_runtime.py)")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_86"])
def test_cuda_sources_compile(tmp_path, arch):
    cuda_src = TREE / "ggml/src/ggml-cuda"
    # the kernels include "../common.cuh": mirror ggml-cuda's headers around a copy of cuda/
    work = tmp_path / "ggml-cuda"
    (work / "loopserve").mkdir(parents=True)
    for h in cuda_src.glob("*.cuh"):
        (work / h.name).symlink_to(h)
    for f in CUDA.iterdir():
        shutil.copy(f, work / "loopserve" / f.name)
    inc = [f"-I{cuda_src}", f"-I{TREE / 'ggml/src'}", f"-I{TREE / 'ggml/include'}"]
    if not cublas_include():
        inc.insert(0, f"-I{STUB}")
    for cu in sorted((work / "loopserve").glob("*.cu")):
        cmd = [nvcc(), "-c", "-std=c++17", f"-arch={arch}", "-O2", *inc,
               str(cu), "-o", str(tmp_path / (cu.stem + f".{arch}.o"))]
        r = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"{cu.name} for {arch}:\n{r.stderr[-4000:]}"
