"""The scaling section of the config tree (`scaling.*`): how many Ray Train workers, where, with what.
shipyard.config assembles the whole tree and re-exports it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from shipyard.serve_config import Section as _Section


class ScalingConfig(_Section):
    num_workers: int | tuple[int, int] | Literal["auto"] = 2
    """Data-parallel Ray Train workers for the final training run: a number, `[min, max]` for elastic
    training (Ray Train's `(min_workers, max_workers)`): the run starts with as many as fit, goes on with fewer
    when a node is lost, and grows back when there is room; or `auto`: the plan's choice, the most workers
    whose predicted efficiency stays >= 70 % and that fit the cluster. The global batch stays the same."""
    resize_check_s: float = Field(60.0, gt=0)
    """Elastic only: how often a healthy run looks for room for more workers (elastic_resize_monitor_interval_s)."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """Where Ray puts the workers (ScalingConfig.placement_strategy): PACK fills a node first (all-reduce stays
    inside it), SPREAD prefers one worker per node, STRICT_SPREAD demands it (waits for enough nodes)."""

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_range(cls, v: Any) -> int | tuple[int, int]:
        """One message for every wrong shape (pydantic's own would list each branch of the union)."""
        if v == "auto":
            return v
        pair = isinstance(v, (list, tuple)) and len(v) == 2
        items = list(v) if pair else [v]
        if (
            not all(isinstance(n, int) and not isinstance(n, bool) for n in items)
            or min(items) < 1
            or (pair and v[1] < v[0])
        ):
            raise ValueError(
                "give a number of workers >= 1, [min, max] with 1 <= min <= max for elastic "
                "training, or auto (the plan chooses), e.g. 4, [1, 4] or auto"
            )
        return tuple(v) if pair else v

    @property
    def max_workers(self) -> int | None:
        """The most workers the run trains on: what the plan prices (None for auto, before the plan chose)."""
        if self.num_workers == "auto":
            return None
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def workers_text(self) -> str:
        if isinstance(self.num_workers, (int, str)):
            return str(self.num_workers)
        low, high = self.num_workers
        return f"{low}-{high} (elastic)"
