"""Levels files (written by calibrate.py): which difficulty each family runs at, per model
and context length, and how a run finds its entry."""
from __future__ import annotations


def model_key(metadata: dict) -> str:
    """A model's name in levels files: its GGUF basename and size label (smollm2-135m)."""
    base = metadata.get("general.basename") or metadata.get("general.name") or "model"
    size = metadata.get("general.size_label", "")
    return "-".join(x for x in (base, size) if x).lower().replace(" ", "-")


def levels_for(levels: dict | None, ctx: int) -> dict:
    """{task: knobs} of a levels file for a context length: its entry for `ctx`, else the
    one of the largest calibrated length below it, else the smallest (families' defaults
    where the file says nothing)."""
    if not levels:
        return {}
    by_ctx = {int(k): v for k, v in levels["levels"].items()}
    below = [c for c in by_ctx if c <= ctx]
    return by_ctx[max(below)] if below else by_ctx[min(by_ctx)]
