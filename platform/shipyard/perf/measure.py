"""The measured mode of the plan (`shipyard plan --measure`): time the model's real training step here, op by
op, and predict other batch sizes, worker counts and devices from it.

    measured = measure_step(build, batch_size=32, make_batch=task.example_batch, loss_fn=task.loss)
    est = measured_estimate(measured, count(64), here, there, workers=2, link=link)

The approach of Habitat (Yu, Gao, Golikov and Pekhimenko, "Habitat: A Runtime-Based Computational Performance
Predictor for Deep Neural Network Training", USENIX ATC 2021): a few real steps run under `torch.profiler`;
each profiled aten op is matched to the op the counter (shipyard.perf.layers) counted at the same place in the
step, and its measured time is scaled to another configuration by the ratio of the op's roofline times there
and here (shipyard.perf.estimate.op_time_s), so that whatever the analytical model misses about this machine
(cache effects, an op's real kernel, the profile's noise) carries over op by op. The time between ops
(Python, autograd's engine) is measured too and scales with the number of ops.

Data parallelism is measured too, on this model (measure_data_parallel): its step alone and in DDP on local gloo
peers at two batch sizes. The calibration's small probes price DDP at +0.87 ms and x1.24 on a 2-vCPU VM, where
the built-in models' own DDP steps in a bare TorchTrainer took +4.5 ms (MLP, 1.5-1.8 -> 6.1-7.2 ms) and x1.5-1.9
(CNN 36-43 -> 61-71 ms, transformer 21-24 -> 32-47 ms at 32 rows a worker): what DDP costs depends on the model.
Without it (another worker count, another link) the all-reduce and DDP's costs are the analytical model's.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import multiprocessing
import os
import queue
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
from torch import nn

from shipyard.perf.comm import Algorithm
from shipyard.perf.devices import Device, Interconnect
from shipyard.perf.estimate import StepEstimate, estimate_step, op_time_s
from shipyard.perf.layers import StepWork, count_step_work
from shipyard.train.step import LossFn, StepOptions, training_step

_STEP_MARK = "shipyard_step_"


@dataclass(frozen=True)
class MeasuredStep:
    """One worker's training step timed on this machine, op by op, at `work.batch_size`."""

    work: StepWork
    """The counted step the measurement was matched to."""
    step_ms: float
    """Median wall time of a step without the profiler (what the training loop's step_time_ms measures)."""
    op_ms: tuple[float | None, ...]
    """Per counted op (work.ops order): its measured time, scaled so that the step adds up to step_ms; None for
    a counted op the profile did not show (e.g. the `loss.item()` the counter adds by hand, or an op the profiler
    names otherwise)."""
    between_ms: float
    """The rest of step_ms: the time between ops (Python, autograd), spread over the ops that ran."""
    spread: float
    """relative_range of the last three rounds' medians of unprofiled steps: how steady the measurement was."""
    threads: int

    @property
    def matched(self) -> int:
        return sum(t is not None for t in self.op_ms)


def match_ops(counted: Sequence[str], measured: Sequence[tuple[str, float]]) -> list[float | None]:
    """The measured time of each counted op: the longest common subsequence of the two op-name sequences
    (difflib's matcher) pairs them, so ops that only one side has (a first step's state initialisation, an op
    the profiler reports under another name) shift nothing. Names as `aten::addmm` on both sides."""
    names = [n for n, _ in measured]
    out: list[float | None] = [None] * len(counted)
    for block in difflib.SequenceMatcher(None, list(counted), names, autojunk=False).get_matching_blocks():
        for i in range(block.size):
            out[block.a + i] = measured[block.b + i][1]
    return out


def _profiled_ops(prof, wanted: set[str]) -> list[list[tuple[str, float]]]:
    """Per profiled step, its outermost ops whose names the counter knows, in order, with their times (ms)."""
    events = prof.events()
    steps = sorted((e for e in events if e.name.startswith(_STEP_MARK)), key=lambda e: e.time_range.start)

    def inside_wanted(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name in wanted:
                return True
            p = p.cpu_parent
        return False

    ops = sorted((e for e in events if e.name in wanted and not inside_wanted(e)), key=lambda e: e.time_range.start)
    within = [[e for e in ops if s.time_range.start <= e.time_range.start < s.time_range.end] for s in steps]
    return [[(e.name, e.time_range.elapsed_us() / 1e3) for e in step] for step in within]


def measure_step(
    build: Callable[[], nn.Module],
    batch_size: int,
    make_batch: Callable[[int], dict[str, torch.Tensor]],
    loss_fn: LossFn,
    options: StepOptions = StepOptions(),
    threads: int = 1,
    budget_s: float = 3.0,
    profiled_steps: int = 5,
    seed: int = 0,
) -> MeasuredStep:
    """Run the real training step of `build()` at `batch_size` on this CPU with `threads` torch threads (a Ray
    worker with 1 CPU runs 1): warm-up steps, rounds of timed steps until the medians of the last three rounds
    agree within 5 % or `budget_s` is spent, then `profiled_steps` under torch.profiler. Inputs are random
    normal (the example batch's zeros could take faster paths); labels stay as made."""
    work = count_step_work(build, batch_size, make_batch=make_batch, loss_fn=loss_fn, options=options)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        batch = make_batch(batch_size)
        if batch["x"].is_floating_point():
            batch["x"] = torch.randn_like(batch["x"])
        model.train()
        for _ in range(3):
            training_step(model, opt, batch, loss_fn, options)
        rounds = steady_rounds(lambda: training_step(model, opt, batch, loss_fn, options), budget_s)
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        with _quiet_stderr():
            prof.start()
        try:
            for i in range(profiled_steps):
                with torch.profiler.record_function(f"{_STEP_MARK}{i}"):
                    training_step(model, opt, batch, loss_fn, options)
        finally:
            with _quiet_stderr():
                prof.stop()
    finally:
        torch.set_num_threads(before)
    counted = [o.name.replace(".", "::", 1) for o in work.ops]
    per_step = [match_ops(counted, ops) for ops in _profiled_ops(prof, set(counted))]
    op_ms: list[float | None] = []
    for i in range(len(counted)):
        seen = [s[i] for s in per_step if s[i] is not None]
        op_ms.append(statistics.median(seen) if seen else None)
    step_ms = statistics.median(rounds[-3:]) * 1e3  # the settled rounds
    ops_total = sum(t for t in op_ms if t is not None)
    # the profiler adds its own cost to every op it records: keep each op's share of the ops' time, and the
    # ops' share of the profiled step, and scale them to the step as measured without the profiler
    ops_share = min(1.0, ops_total / max(_profiled_wall_ms(prof), 1e-9))
    scale = step_ms * ops_share / max(ops_total, 1e-9)
    return MeasuredStep(
        work=work,
        step_ms=step_ms,
        op_ms=tuple(None if t is None else t * scale for t in op_ms),
        between_ms=step_ms * (1 - ops_share),
        spread=relative_range(rounds[-3:]),
        threads=threads,
    )


@contextlib.contextmanager
def _quiet_stderr():
    """torch 2.13's profiler back end (Kineto) writes `USDT: ... profiler_start` and `profiler_stop` lines
    straight to file descriptor 2 at every start and stop, whatever KINETO_LOG_LEVEL says: hold them back
    for those two calls only."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def relative_range(values: Sequence[float]) -> float:
    """(max - min) / median: how far apart repeated measurements of one thing are."""
    return (max(values) - min(values)) / statistics.median(values) if values else 0.0


def steady_rounds(fn: Callable[[], object], budget_s: float, round_steps: int = 10, tol: float = 0.05) -> list[float]:
    """Time `fn` in rounds of `round_steps` calls until the medians of the last three rounds lie within `tol`
    of each other (relative_range) or `budget_s` is spent (at least three rounds): each round's median, in s."""
    start, rounds = time.perf_counter(), []
    while True:
        calls = []
        for _ in range(round_steps):
            t = time.perf_counter()
            fn()
            calls.append(time.perf_counter() - t)
        rounds.append(statistics.median(calls))
        if len(rounds) >= 3 and (relative_range(rounds[-3:]) <= tol or time.perf_counter() - start > budget_s):
            return rounds


def _profiled_wall_ms(prof) -> float:
    """Median wall time of a profiled step (its record_function range)."""
    steps = [e for e in prof.events() if e.name.startswith(_STEP_MARK)]
    return statistics.median(e.time_range.elapsed_us() / 1e3 for e in steps)


def lines_up(measured: MeasuredStep, work: StepWork) -> bool:
    """Whether `work` runs the measured step's ops in the same order (another batch size of the same step)."""
    return [o.name for o in work.ops] == [o.name for o in measured.work.ops]


@dataclass(frozen=True)
class MeasuredDataParallel:
    """The model's step on `workers` local gloo peers, measured at two per-worker batch sizes: rank 0 alone (the
    others waiting) and every rank at once in DDP (the slowest rank's median). A DDP step is then priced as
    `slowdown` x the step alone + `fixed_ms` (a line through the two points): the peers slowing each other's
    compute, and what a step costs beyond it (the all-reduce, waking up for it, DDP's hooks)."""

    workers: int
    batches: tuple[int, int]
    alone_ms: tuple[float, float]
    ddp_ms: tuple[float, float]

    @property
    def slowdown(self) -> float:
        """The line's slope, at least 1 (a peer never makes a step's compute faster); 1 where DDP's step did not
        grow with the batch (a small model: the noise is larger than its compute)."""
        (a1, a2), (d1, d2) = self.alone_ms, self.ddp_ms
        if a2 - a1 <= 1e-9 or d2 <= d1:
            return 1.0
        return max(1.0, (d2 - d1) / (a2 - a1))

    @property
    def fixed_ms(self) -> float:
        """The line's intercept, fitted to both points for the slope (their mean gap), at least 0."""
        s = self.slowdown
        return max(0.0, statistics.fmean(d - s * a for a, d in zip(self.alone_ms, self.ddp_ms)))

    def step_ms(self, alone_ms: float) -> float:
        return self.slowdown * alone_ms + self.fixed_ms


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_peer(rank, workers, port, threads, build, batches, make_batch, loss_fn, options, budget_s, out) -> None:
    """One peer of measure_data_parallel (a forked process): for each batch size, rank 0 times the step alone,
    then all ranks run the same number of DDP steps; rank 0 puts the alone and slowest-rank medians on `out`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers, timeout=timedelta(seconds=60)
    )
    try:
        result = []
        for b in batches:
            torch.manual_seed(0)
            batch = make_batch(b)
            if batch["x"].is_floating_point():
                batch["x"] = torch.randn_like(batch["x"])
            steps = torch.zeros(1)
            if rank == 0:
                model = build()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
                step = functools.partial(training_step, model, opt, batch, loss_fn, options)
                rounds = steady_rounds(step, budget_s / 2, 5)
                alone_s = statistics.median(rounds[-3:])
                steps[0] = max(10, min(200, int(budget_s / 2 / max(alone_s, 1e-6))))
            dist.broadcast(steps, 0)  # every rank runs as many DDP steps (a collective each)
            model = DistributedDataParallel(build())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
            times = []
            for i in range(int(steps[0]) + 3):
                start = time.perf_counter()
                training_step(model, opt, batch, loss_fn, options)
                if i >= 3:  # after DDP's first steps (its buckets are rebuilt after the first)
                    times.append(time.perf_counter() - start)
            slowest = torch.tensor([statistics.median(times)])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if rank == 0:
                result.append((alone_s * 1e3, float(slowest[0]) * 1e3))
        if rank == 0:
            out.put(result)
    finally:
        dist.destroy_process_group()


def measure_data_parallel(
    build: Callable[[], nn.Module],
    batch_size: int,
    make_batch: Callable[[int], dict[str, torch.Tensor]],
    loss_fn: LossFn,
    options: StepOptions = StepOptions(),
    threads: int = 1,
    workers: int = 2,
    budget_s: float = 2.0,
    timeout_s: float = 300.0,
) -> MeasuredDataParallel:
    """The model's step alone and in DDP on `workers` local processes (gloo on 127.0.0.1, `threads` torch
    threads each), at `batch_size` and 4x it rows a worker; about `budget_s` per batch size. The processes are
    forked, so `build` and `make_batch` may be closures; they must not use what does not survive a fork (a
    Ray client, a GPU context): plain torch. A peer that fails ends the measurement at once (RuntimeError)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    port = _free_port()
    batches = (batch_size, 4 * batch_size)
    args = (workers, port, threads, build, batches, make_batch, loss_fn, options, budget_s, out)
    procs = [ctx.Process(target=_dp_peer, args=(rank, *args), daemon=True) for rank in range(workers)]
    for proc in procs:
        proc.start()
    deadline, result, why = time.monotonic() + timeout_s, None, f"no answer after {timeout_s:.0f} s"
    try:
        while result is None and time.monotonic() < deadline:
            try:
                result = out.get(timeout=0.2)
            except queue.Empty:
                failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed:  # a peer died: the others would wait for it in a collective
                    why = "peer(s) exited early (rank, exit code): " + ", ".join(f"{r}: {c}" for r, c in failed)
                    break
    finally:
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
        out.close()
    if result is None:
        raise RuntimeError(
            f"measuring the model's data-parallel step on {workers} local gloo processes failed: {why} (their "
            "tracebacks are above); plan without it: drop --measure (or set plan.measure=false)"
        )
    return MeasuredDataParallel(workers, batches, (result[0][0], result[1][0]), (result[0][1], result[1][1]))


def measured_estimate(
    measured: MeasuredStep,
    work: StepWork,
    here: Device,
    there: Device | None = None,
    workers: int = 1,
    link: Interconnect | None = None,
    algorithm: Algorithm = "ring",
    dtype: str = "fp32",
    parallel: MeasuredDataParallel | None = None,
) -> StepEstimate:
    """One worker's step of `work` (another batch size of the measured model) on `there` (default: this
    machine, `here`), `workers` data-parallel peers over `link`: each measured op times the ratio of its
    roofline times there and here (Habitat's scaling); an op the measurement did not see keeps its analytical
    time; the time between ops scales with their number. Collectives: the analytical model's. A step whose ops
    do not line up with the measured one (another model, or micro-batches that a small batch cannot split as
    often) gets the analytical estimate: see lines_up."""
    there = there or here
    analytical = estimate_step(work, there, workers, link, algorithm, dtype)
    if not lines_up(measured, work):
        return analytical
    phase_ms = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for op_here, op_there, t in zip(measured.work.ops, work.ops, measured.op_ms):
        analytical_there = op_time_s(op_there, there, dtype) * 1e3
        if t is None:
            phase_ms[op_there.phase] += analytical_there
        else:
            phase_ms[op_there.phase] += t * analytical_there / max(op_time_s(op_here, here) * 1e3, 1e-12)
    # the time between ops: Python and autograd's engine, on the host CPU wherever the ops run
    ran = max(measured.matched, 1)
    for op, t in zip(work.ops, measured.op_ms):
        if t is not None:
            phase_ms[op.phase] += measured.between_ms / ran
    if parallel is not None and workers == parallel.workers and there == here:
        return replace(
            analytical,
            forward_ms=phase_ms["forward"] * parallel.slowdown,
            backward_ms=phase_ms["backward"] * parallel.slowdown,
            optimizer_ms=phase_ms["optimizer"] * parallel.slowdown,
            exposed_comm_ms=0.0,  # measured within fixed_ms: the all-reduce hides nothing on a CPU host
            ddp_overhead_ms=parallel.fixed_ms,
        )
    slowdown = link.compute_slowdown if workers > 1 and link is not None else 1.0
    return replace(
        analytical,
        forward_ms=phase_ms["forward"] * slowdown,
        backward_ms=phase_ms["backward"] * slowdown,
        optimizer_ms=phase_ms["optimizer"] * slowdown,
    )
