"""The promotion gate: pure decision logic, unit-tested without MLflow or Ray."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate_accuracy: float, champion_accuracy: float | None) -> Decision:
    """Promote only if the candidate strictly beats the champion, both scored on the same held-out split.

    A tie keeps the champion: moving the alias for no gain would churn the endpoint.
    """
    if champion_accuracy is None:
        return Decision(True, "no current champion: the first candidate always wins")
    if candidate_accuracy > champion_accuracy:
        return Decision(True, f"candidate {candidate_accuracy:.4f} beats champion {champion_accuracy:.4f} "
                              "on the same test split")
    return Decision(False, f"candidate {candidate_accuracy:.4f} does not beat champion {champion_accuracy:.4f} "
                           "on the same test split")
