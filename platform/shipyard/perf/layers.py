"""Work per layer of one training step, counted from the real model: FLOPs, bytes moved and op count.

    work = count_step_work(model, batch_size=64, in_features=64)   # meta tensors: nothing is computed
    work.by_layer()[0]  # LayerWork('0', fwd_flops=..., ...)

The FLOPs are torch's own (`torch.utils.flop_counter.FlopCounterMode` and its formula registry); this module
adds, per aten op, the bytes it reads and writes, its class (matmul/conv vs element-wise vs view) and the leaf
module and phase (forward, backward, optimizer) it ran in, which a roofline needs op by op (Paleo, Qi et al.
ICLR 2017, Sec. 3.1: a layer's time is its compute or its memory traffic, whichever is larger).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from shipyard.train.step import LossFn, StepOptions, training_step

Phase = Literal["forward", "backward", "optimizer"]
OpClass = Literal["matmul", "conv", "norm", "reduction", "random", "elementwise", "view"]
OP_CLASSES: tuple[str, ...] = ("matmul", "conv", "norm", "reduction", "random", "elementwise", "view")
COMPUTE_CLASSES = ("matmul", "conv")
"""Classes whose rate is FLOP/s (the others move bytes: their rate is bytes/s)."""

# Op classes beyond Paleo's two (matmul/conv vs element-wise): on a CPU a normalization, a softmax or pooling
# (reductions) and a random mask (dropout) each run at their own rate per byte, several times below a
# streaming add (measured by `shipyard calibrate`; RNG and reductions are compute-bound on one core).
_CLASS_BY_OP = {
    **dict.fromkeys(("convolution", "_convolution", "convolution_backward", "mkldnn_convolution"), "conv"),
    **dict.fromkeys(
        (
            "native_batch_norm",
            "native_batch_norm_backward",
            "_native_batch_norm_legit",
            "_native_batch_norm_legit_functional",
            "_native_batch_norm_legit_no_training",
            "batch_norm_backward",
            "native_layer_norm",
            "native_layer_norm_backward",
            "native_group_norm",
            "native_group_norm_backward",
        ),
        "norm",
    ),
    **dict.fromkeys(
        (
            "_softmax",
            "_log_softmax",
            "_softmax_backward_data",
            "_log_softmax_backward_data",
            "_adaptive_avg_pool2d",
            "_adaptive_avg_pool2d_backward",
            "avg_pool2d",
            "avg_pool2d_backward",
            "max_pool2d_with_indices",
            "max_pool2d_with_indices_backward",
            "mean",
            "sum",
            "amax",
            "nll_loss_forward",
            "nll_loss_backward",
            "argmax",
        ),
        "reduction",
    ),
    **dict.fromkeys(
        (
            "bernoulli_",
            "bernoulli",
            "native_dropout",
            "rand",
            "randn",
            "uniform_",
            "normal_",
            "rand_like",
            "randn_like",
        ),
        "random",
    ),
}


def op_class_of(name: str, flops: int, is_view: bool) -> OpClass:
    base = name.split(".")[-1]
    if base in _CLASS_BY_OP:
        return _CLASS_BY_OP[base]  # type: ignore[return-value]
    if flops > 0:
        return "matmul"
    return "view" if is_view else "elementwise"


# ops that write their output without reading an input's data
_WRITE_ONLY = {
    "zeros_like",
    "empty_like",
    "ones_like",
    "full_like",
    "empty",
    "zeros",
    "ones",
    "full",
    "fill_",
    "zero_",
    "new_empty",
    "new_zeros",
    "empty_strided",
    "scalar_tensor",
    "lift_fresh",
}


@dataclass(frozen=True)
class OpWork:
    name: str
    """aten op, e.g. `aten.addmm`."""
    layer: str
    """Leaf module that ran it (`0`, `features.3`), or `(loss)`/`(optimizer)` outside any submodule."""
    phase: Phase
    op_class: OpClass
    flops: int
    bytes_moved: int
    """Bytes read plus bytes written, counted from the op's tensor arguments and results."""


@dataclass(frozen=True)
class LayerWork:
    layer: str
    kind: str
    """Module class, e.g. Linear, Conv2d."""
    flops: dict[str, int]
    """Per phase: forward, backward, optimizer."""
    bytes_moved: dict[str, int]
    ops: int
    param_bytes: int
    activation_bytes: int
    """Bytes of this layer's forward outputs (kept for the backward pass)."""


@dataclass(frozen=True)
class StepWork:
    """One training step (zero_grad, forward, loss, backward, optimizer step) of one worker's batch."""

    batch_size: int
    ops: tuple[OpWork, ...]
    param_bytes: int
    grad_bytes: int
    param_sizes_bytes: tuple[int, ...]
    """Each parameter's gradient size, in registration order (DDP buckets them in reverse of this)."""
    layer_kinds: dict[str, str] = field(default_factory=dict)
    activation_bytes: dict[str, int] = field(default_factory=dict)
    layer_params: dict[str, int] = field(default_factory=dict)
    param_layers: tuple[str, ...] = ()
    """The layer owning each parameter, in the order of param_sizes_bytes."""

    @property
    def flops(self) -> int:
        return sum(o.flops for o in self.ops)

    def flops_in(self, phase: Phase) -> int:
        return sum(o.flops for o in self.ops if o.phase == phase)

    def by_layer(self) -> list[LayerWork]:
        flops: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        moved: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        ops: dict[str, int] = defaultdict(int)
        for o in self.ops:
            flops[o.layer][o.phase] += o.flops
            moved[o.layer][o.phase] += o.bytes_moved
            ops[o.layer] += 1
        return [
            LayerWork(
                name,
                self.layer_kinds.get(name, name),
                dict(flops[name]),
                dict(moved[name]),
                ops[name],
                self.layer_params.get(name, 0),
                self.activation_bytes.get(name, 0),
            )
            for name in ops
        ]


def _leaf(parents: set[str]) -> str:
    """ModuleTracker's parents are every enclosing FQN (`Global`, `Sequential`, `Sequential.0`): the deepest
    one, without the root's class name, is the layer."""
    names = [p for p in parents if p != "Global"]
    if not names:
        return ""
    deepest = max(names, key=lambda p: p.count("."))
    return deepest.split(".", 1)[1] if "." in deepest else ""


class _WorkCounter(FlopCounterMode):
    """FlopCounterMode that also keeps one record per op: torch 2.13's `_count_flops` sees every op that runs
    (ops without a formula count 0 FLOPs), with the module tracker's view of where it ran."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.phase: Phase = "optimizer"
        self.outside = "(optimizer)"
        """Name for ops outside any submodule: the root module's own ops, the loss, the optimizer."""
        self.ops: list[OpWork] = []
        self.activation_bytes: dict[str, int] = defaultdict(int)

    def _count_flops(self, func_packet, out, args, kwargs):
        name = str(func_packet)
        flops = (
            self.flop_registry[func_packet](*args, **kwargs, out_val=out) if func_packet in self.flop_registry else 0
        )
        returns = next(iter(func_packet._schemas.values())).returns if func_packet._schemas else []
        alias = returns[0].alias_info if returns else None
        is_view = alias is not None and not alias.is_write  # a view moves no data; in-place ops write
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = 0
        if not is_view:
            moved = sum(t.nbytes for t in outs)
            if name.split(".")[-1] not in _WRITE_ONLY:
                moved += sum(t.nbytes for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        layer = _leaf(set(self.mod_tracker.parents)) or self.outside
        if self.phase == "forward" and not is_view:
            self.activation_bytes[layer] += sum(t.nbytes for t in outs)
        op_class = op_class_of(name, flops, is_view)
        self.ops.append(OpWork(name, layer, self.phase, op_class, int(flops), int(moved)))
        return super()._count_flops(func_packet, out, args, kwargs)


def count_ops(fn: Callable[[], object]) -> list[OpWork]:
    """Every op `fn()` runs, counted as in a training step (calibration probes use this)."""
    counter = _WorkCounter()
    counter.phase, counter.outside = "forward", "(probe)"
    with counter:
        fn()
    return counter.ops


def count_step_work(
    build: Callable[[], nn.Module],
    batch_size: int,
    in_features: int | None = None,
    num_classes: int = 10,
    foreach: bool = False,
    device: str = "meta",
    forward_only: bool = False,
    *,
    make_batch: Callable[[int], dict[str, torch.Tensor]] | None = None,
    loss_fn: LossFn | None = None,
    options: StepOptions = StepOptions(),
) -> StepWork:
    """Count one training step of `build()` on a batch of `batch_size` rows: the step of
    `shipyard.train.step.training_step` itself (zero_grad, forward, the loss, backward, clipping, AdamW, `loss.item()`),
    with `options` (micro-batches, precision) as the training loop runs it: the second step, which every later
    step repeats (the first also creates the optimizer's state).

    The batch: `make_batch(batch_size)` (a task's example batch), else float32 rows of `in_features` with
    class labels; the loss: `loss_fn` (a task's), else cross-entropy. On the meta device (default) nothing is
    computed or allocated: any model and batch size is counted in milliseconds. `foreach`: AdamW's multi-tensor
    update, PyTorch's default on CUDA (per-tensor on CPU). `forward_only`: the evaluation pass instead (eval
    mode, no autograd), as `train.evaluate` runs it.
    """
    with torch.device(device):
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=foreach)
        batch = (
            make_batch(batch_size)
            if make_batch is not None
            else {"x": torch.randn(batch_size, in_features), "y": torch.zeros(batch_size, dtype=torch.long)}
        )
    loss_fn = loss_fn or nn.functional.cross_entropy
    counter = _WorkCounter()
    if forward_only:
        model.eval()
        with counter, torch.no_grad():
            counter.phase, counter.outside = "forward", "(model)"
            model(batch["x"])
        return StepWork(batch_size, tuple(counter.ops), 0, 0, ())
    model.train()
    where = {
        "forward": ("forward", "(model)"),
        "loss": ("forward", "(loss)"),
        "backward": ("backward", "(model)"),
        "optimizer": ("optimizer", "(optimizer)"),
    }

    def mark(phase: str) -> None:
        if phase == "item":  # loss.item() on meta has no value to read: count the op as the real step runs it
            counter.ops.append(OpWork("aten._local_scalar_dense", "(loss)", "forward", "elementwise", 0, 8))
        else:
            counter.phase, counter.outside = where[phase]

    # the step a run repeats: the first one also creates the optimizer's state (two zeros_like per parameter
    # for AdamW, and their bookkeeping: 34 of 144 ops of the digits MLP), which no later step runs
    training_step(model, opt, batch, loss_fn, options)
    with counter:
        training_step(model, opt, batch, loss_fn, options, mark)
    if not counter.ops:  # FlopCounterMode internals this module relies on moved (another torch than 2.13)
        raise RuntimeError(
            f"no ops counted for one training step with torch {torch.__version__}: shipyard.perf "
            "needs the torch the project pins (2.13)"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name}
    layer_params = {name: sum(p.nbytes for p in m.parameters(recurse=False)) for name, m in model.named_modules()}
    owners = tuple(
        name.rsplit(".", 1)[0] if "." in name else "(model)" for name, p in model.named_parameters() if p.requires_grad
    )
    return StepWork(
        batch_size,
        tuple(counter.ops),
        sum(p.nbytes for p in params),
        sum(p.nbytes for p in params),
        tuple(p.nbytes for p in params),
        kinds,
        dict(counter.activation_bytes),
        layer_params,
        owners,
    )
