"""The promotion gate: which version should hold `champion`, and the protocol that moves the alias safely when
several pipelines promote into one registry at once. Pure: no MLflow or Ray here.

`steps()` is the protocol written sans-I/O: a generator that yields registry requests (`Read`, `Score`, `Move`,
...) and is sent their answers. `tracking.promote_if_better` performs them on MLflow; tests/unit/test_promotion.py
performs them on a dict under thousands of adversarial interleavings.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DECIDING, SETTLED = "deciding", "settled"
MAX_ROUNDS = 5
"""Read-decide-write rounds before a promoter stops deciding although the registry still changes under it."""
STALE_CLAIM_S = 300.0
"""A claim whose heartbeat is older is taken for a promoter that died: it is neither scored nor waited for.
Promoters on different machines compare their clocks through it: they must agree to well within this."""
MAX_WAIT_S = 300.0
"""How long a settled promoter waits for others still deciding before it leaves anyway (and says so)."""
POLL_S = 0.25


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class Gate:
    """The task's primary metric and its direction: what "beats" means (a higher accuracy, a lower RMSE)."""

    metric: str = "accuracy"
    mode: str = "max"

    def beats(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def key(self, score: float) -> float:
        """Larger is better, whatever the direction: for max() over scores."""
        return score if self.mode == "max" else -score

    def show(self, score: float) -> str:
        return f"{score:.4f}" if self.metric == "accuracy" else f"{self.metric} {score:.4f}"


ACCURACY = Gate()


def decide(candidate: float, champion: float | None, gate: Gate = ACCURACY) -> Decision:
    """Promote only if the candidate strictly beats the champion, both scored on the same held-out split.

    A tie keeps the champion: moving the alias for no gain would churn the endpoint.
    """
    if champion is None:
        return Decision(True, "no current champion: the first candidate always wins")
    if gate.beats(candidate, champion):
        return Decision(
            True, f"candidate {gate.show(candidate)} beats champion {gate.show(champion)} on the same test split"
        )
    return Decision(
        False, f"candidate {gate.show(candidate)} does not beat champion {gate.show(champion)} on the same test split"
    )


def choose(champion: str | None, scores: Mapping[str, float | None], gate: Gate = ACCURACY) -> str | None:
    """The version that should hold the alias: the best scored contender if it strictly beats the champion.

    `scores` holds the champion's and every contender's accuracy on the same rows (None: it cannot take them).
    Ties between contenders go to the lower version; a tie with the champion keeps it (`decide`). A champion
    that cannot be scored stays: nothing can be compared with it.
    """
    if champion is not None and scores.get(champion) is None:
        return champion
    scored = [(s, v) for v, s in scores.items() if s is not None and v != champion]
    if not scored:
        return champion
    best_score, best = max(scored, key=lambda sv: (gate.key(sv[0]), -int(sv[1])))
    if champion is None or decide(best_score, scores[champion], gate).promote:
        return best
    return champion


def next_history(history: Sequence[str], before: str | None, version: str) -> list[str]:
    """The champion history after the alias moves from `before` to `version` (the last 50 entries).

    `before` is appended first when the history does not end with it: the alias was moved by hand, by an older
    Shipyard, or by a concurrent promoter whose history write was overwritten.
    """
    out = list(history)
    if before is not None and (not out or out[-1] != before):
        out.append(before)
    if not out or out[-1] != version:
        out.append(version)
    return out[-50:]


def outcome(
    version: str,
    accuracy: float,
    first: str | None,
    first_accuracy: float | None,
    final: str | None,
    final_accuracy: float | None,
    gate: Gate = ACCURACY,
) -> Decision:
    """What a promoter reports for its version: promoted iff it holds the alias at the end.

    `first` is the champion it found, `final` the one it leaves; they differ from each other and from `version`
    when a concurrent promoter moved the alias meanwhile.
    """
    if first == version and final == version:
        return Decision(True, f"v{version} already holds champion")
    if first is not None and first != version and first_accuracy is None:
        return Decision(
            final == version,
            f"champion v{first} cannot be scored on this data (different features?); "
            "move the alias by hand or use another tracking.model_name",
        )
    first_gate = decide(accuracy, None if first == version else first_accuracy, gate)
    if final == version:
        return (
            first_gate
            if first_gate.promote
            else Decision(
                True,
                f"candidate {gate.show(accuracy)} holds champion after concurrent promotions (v{first} had "
                f"{gate.show(first_accuracy)})",
            )
        )
    if not first_gate.promote:
        return first_gate
    if final == first:
        return Decision(
            False,
            f"{first_gate.reason}, but v{first} holds the alias again (moved back by hand, or "
            "by a pipeline that scores on other rows)",
        )
    if final_accuracy is not None and not gate.beats(accuracy, final_accuracy):
        return Decision(
            False,
            f"candidate {gate.show(accuracy)} does not beat v{final} "
            f"({gate.show(final_accuracy)}), promoted meanwhile by a concurrent pipeline; "
            f"{first_gate.reason}",
        )
    theirs = "cannot be scored on this data" if final_accuracy is None else f"{gate.show(final_accuracy)} here"
    return Decision(
        False,
        f"v{final} ({theirs}) took the alias from a concurrent pipeline that scores on other rows; {first_gate.reason}",
    )


# -- the protocol ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A version whose promoter is at work: `deciding` (it may still move the alias) or `settled` (it moves
    nothing and waits for the deciding ones before it removes its claim)."""

    version: str
    phase: str
    heartbeat: float
    """Unix seconds of the promoter's last write of its claim."""


@dataclass(frozen=True)
class View:
    """The registry as one `Read` saw it: the claims first, then the alias and its history."""

    champion: str | None
    history: tuple[str, ...]
    claims: tuple[Claim, ...]
    now: float


@dataclass(frozen=True)
class Read:
    """-> View."""


@dataclass(frozen=True)
class Score:
    """-> the version's accuracy on this promoter's test rows, None if it cannot take them."""

    version: str


@dataclass(frozen=True)
class Mark:
    """Write this promoter's claim (phase, heartbeat); a `deciding` mark also tags the version pending. -> None"""

    phase: str


@dataclass(frozen=True)
class Move:
    """Point the alias at `version` (away from `before`, as last read), then write `history`. -> None"""

    version: str
    before: str | None
    history: tuple[str, ...]


@dataclass(frozen=True)
class WriteHistory:
    """Write the champion history alone (it does not end with the champion). -> None"""

    history: tuple[str, ...]


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Release:
    """Replace this promoter's claim with the reason of its decision. -> None"""

    reason: str


Request = Read | Score | Mark | Move | WriteHistory | Sleep | Release


def steps(
    version: str,
    accuracy: float,
    *,
    max_rounds: int = MAX_ROUNDS,
    stale_claim_s: float = STALE_CLAIM_S,
    max_wait_s: float = MAX_WAIT_S,
    poll_s: float = POLL_S,
    gate: Gate = ACCURACY,
) -> Generator[Request, Any, tuple[Decision, float | None]]:
    """Promote `version` (its primary metric on this promoter's test rows; `gate` says which is better; the
    names below say accuracy for short) without compare-and-set on the alias.

    1. Claim: mark the version `deciding` (tagged pending) before reading anything.
    2. Decide, in rounds: read the live claims, then the alias and its history; score what is new on this
       promoter's rows; `choose` the version that should hold the alias and move it there (or append the
       champion to a history that lost it). A round that writes nothing settles the promoter; after
       `max_rounds` it settles anyway and logs a warning.
    3. Mark the claim `settled`, wait until no other claim is `deciding`, then replace the claim by the reason.
       Returns (decision, accuracy of the champion found first; None when there was none).

    Why the alias ends on the best version (all promoters scoring on the same rows, no claim going stale):
    only deciding promoters write, each write is followed by a read of that writer, and a writer settles only
    when its read finds the alias on a version no live claim strictly beats, and the history ending with it.
    Take the last write W, by P, to version v. P's settling read comes after W, so it sees the final alias
    (v) and every claim present then. Any candidate x, promoted by Q, is one of:
      - still claimed at that read: P compared x with v, so x does not beat v;
      - claimed after that read: Q's reads all see v (W was last) and Q never wrote, so x does not beat v;
      - released before that read: Q saw no deciding claim at some moment o before it released, so P (deciding
        from its claim until after its read) claimed after o. At o the champion did not lose to x: Q's
        settling read found so, and any write between that read and o was made by a promoter that settled
        before o, after a read that still saw Q's claim. After o only promoters that claimed after o write,
        each to a version strictly better than a champion it read, so the champion never gets worse than at o.
    A promoter that settles and releases at once, as in step 3 without the wait, breaks the third case: a
    stale writer (read the old champion, wrote after x took the alias and Q left) would never see x again.
    The same argument, with "history ends with the alias" for "no claim beats the alias", leaves the history
    consistent with the alias. The unit tests replay the protocol under adversarial interleavings.
    """
    scores: dict[str, float | None] = {version: accuracy}
    first: View | None = None
    yield Mark(DECIDING)
    marked_at = None
    for _ in range(max_rounds):
        view = yield Read()
        first = first or view
        marked_at = view.now if marked_at is None else marked_at
        live = [c.version for c in view.claims if view.now - c.heartbeat < stale_claim_s]
        contenders = dict.fromkeys([*([view.champion] if view.champion else []), version, *live])
        for v in contenders:
            if v not in scores:
                scores[v] = yield Score(v)
        target = choose(view.champion, {v: scores[v] for v in contenders}, gate)
        if target != view.champion:
            yield Move(target, view.champion, tuple(next_history(view.history, view.champion, target)))
        elif target is not None and view.history[-1:] != (target,):
            yield WriteHistory(tuple(next_history(view.history, None, target)))
        else:
            break
        if view.now - marked_at > stale_claim_s / 4:
            yield Mark(DECIDING)
            marked_at = view.now
    else:
        log.warning(
            "v%s: the champion alias still moved after %d rounds of promotion (other pipelines keep "
            "promoting, or they score on other test rows); settling without a final check",
            version,
            max_rounds,
        )
    yield Mark(SETTLED)
    waited_since = marked_at = None
    while True:
        view = yield Read()
        busy = [
            c.version
            for c in view.claims
            if c.version != version and c.phase == DECIDING and view.now - c.heartbeat < stale_claim_s
        ]
        if not busy:
            break
        waited_since = view.now if waited_since is None else waited_since
        marked_at = view.now if marked_at is None else marked_at
        if view.now - waited_since > max_wait_s:
            log.warning(
                "v%s: versions %s still deciding after %.0f s; leaving without waiting for them, so a "
                "late write of theirs may go unchecked",
                version,
                ", ".join(busy),
                max_wait_s,
            )
            break
        if view.now - marked_at > stale_claim_s / 4:
            yield Mark(SETTLED)
            marked_at = view.now
        yield Sleep(poll_s)
    final = view.champion
    if final is not None and final not in scores:
        scores[final] = yield Score(final)
    first_accuracy = scores.get(first.champion) if first.champion not in (None, version) else None
    decision = outcome(version, accuracy, first.champion, first_accuracy, final, scores.get(final), gate)
    yield Release(decision.reason)
    return decision, first_accuracy
