"""benchmarks/decode_kernels.py: a decode step's wall time, and its kernels from ncu's CSV."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "decode_kernels.py"
HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n')


def _csv(path: Path, kernels: list[tuple[str, str, str]]) -> Path:
    rows = [f'"{i}","1","python3","h","{name}","1","7","(32, 4, 1)","(1, 8, 9)","0","9.0","Command line profiler '
            f'metrics","gpu__time_duration.sum","{unit}","{value}"\n' for i, (name, unit, value) in enumerate(kernels)]
    path.write_text("==PROF== Connected to process 1\n" + HEADER + "".join(rows))
    return path


def test_the_table_sums_each_kernel_per_step_in_microseconds(tmp_path):
    # 8 steps (the script's STEPS); ncu writes "ns" (older versions "nsecond") and 1,234 for thousands
    a = _csv(tmp_path / "a.csv", [("void flash_attn_ext_vec<64, 1>(const char *)", "ns", "4,000")] * 8
             + [("void mul_mat_vec_f<half>(int)", "nsecond", "16000")] * 8)
    b = _csv(tmp_path / "b.csv", [("void flash_attn_ext_vec<64, 1>(const char *)", "ns", "6,000")] * 8
             + [("void flash_attn_combine_results<64>(int)", "us", "2")] * 8)
    out = subprocess.run([sys.executable, str(SCRIPT), "--table", str(a), str(b)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in out[2:]}
    assert rows["void mul_mat_vec_f"] == ["16.0", "0.0 |"]
    assert rows["void flash_attn_ext_vec"] == ["4.0", "6.0 |"]
    assert rows["void flash_attn_combine_results"] == ["0.0", "2.0 |"]
    assert rows["**all, us a step**"] == ["20.0", "8.0 |"]


def test_wall_time_of_steps_on_the_cpu(tiny_model):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tiny_model), "40", "--steps", "5"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "# 40 cells filled, 5 steps:" in r.stderr and "ms a step (wall)" in r.stderr
