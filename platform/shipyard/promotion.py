"""The promotion gate: pure decision logic, unit-tested without MLflow or Ray."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate: float, champion: float | None, higher_is_better: bool = True, min_delta: float = 0.0
           ) -> Decision:
    """Promote only if the candidate strictly beats the champion, both scored on the same held-out split.

    A tie keeps the champion: moving the alias for no gain would churn the endpoint.
    """
    if champion is None:
        return Decision(True, "no current champion: the first candidate always wins")
    gain = candidate - champion if higher_is_better else champion - candidate
    if gain > min_delta:
        return Decision(True, f"candidate {candidate:.4f} beats champion {champion:.4f} on the same test split")
    return Decision(False, f"candidate {candidate:.4f} does not beat champion {champion:.4f} on the same test split")
