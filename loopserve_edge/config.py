"""The one frozen configuration object that is passed down through the controller."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Policies named by the decode-phase issue; only `full` is implemented so far.
POLICIES = ("full", "streaming", "snapkv", "h2o", "loopserve")
IMPLEMENTED_POLICIES = ("full",)


@dataclass(frozen=True)
class LoopServeConfig:
    # Dialogues resident in the context at once, each a llama.cpp sequence with its own
    # n_ctx cells (KV memory grows with it); the least recently used one beyond this is
    # swapped out to RAM and swapped back on its next turn.
    max_resident: int = 2

    # Phase 1, adaptive sparse prefill (off until its issue lands).
    sparse_prefill: bool = False
    alpha: float = 0.95
    last_q: int = 64

    # Phase 2, progressive KV compression in decoding.
    policy: str = "full"
    budget: int | None = None
    interval: int = 16
    window: int = 16
    sink: int = 4
    recent: int = 64

    def __post_init__(self) -> None:
        if self.max_resident < 1:
            raise ValueError("max_resident must be >= 1")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.policy not in IMPLEMENTED_POLICIES:
            raise ValueError(f"policy {self.policy!r} is not implemented yet (available: "
                             f"{', '.join(IMPLEMENTED_POLICIES)})")
        if self.sparse_prefill:
            raise ValueError("sparse prefill is not implemented yet")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopServeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
