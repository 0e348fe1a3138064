"""Throughput of reduction plans, always next to the unreduced baseline measured in the same run.

    results = ts.benchmark(model, plans=["random:keep=0.5", "sta:r=64"], batch_size=[1, 8])
    print(to_json(results))

Method (the conventions of ToMe's and STA's benchmarks, made robust to drift on shared machines):

1. Every plan is installed once with `tokensieve.apply` and its GFLOPs per clip counted at batch 1
   in float32 on the same random input the timing uses (see `tokensieve.flops`).
2. For each batch size, plans run in interleaved rounds (baseline, A, B, then A, B, baseline, ...;
   the order rotates so no plan always follows another): `warmup` untimed rounds, then `repeats`
   timed ones. One timed run is one forward pass of a batch under `torch.inference_mode`, timed
   with `time.perf_counter` (the device synchronised on both sides; on CUDA with events recorded in
   the stream around it, read after a synchronisation).
3. Reported: the median seconds per batch and its interquartile range, clips/s, and the ratios to
   the baseline: `gflops_ratio = baseline_gflops / gflops`, `speedup = clips_per_s / baseline
   clips_per_s`. Because rounds interleave, the per-round ratios baseline/plan are paired samples;
   their interquartile range (`speedup_iqr`) says how much of a speed-up is noise.
   `efficiency = speedup / gflops_ratio` says how much of the FLOP saving reaches the wall clock.
   `spread` (the table's IQR column) is that range over the speed-up (for the baseline, which has
   no pair: its seconds' range over their median); above `BUSY_SPREAD` (15%) the rounds disagree
   more than a quiet machine lets them, and `busy_warning` says so (logged, and in the JSON).
4. The reducers' own time (`reducer_share` of the forward) is read by forward hooks around each
   reducer slot, in the same timed runs (on CUDA they record events in the stream: no synchronisation).
5. Peak memory per clip (`peak_mb`): one more, untimed forward per plan and batch size (CUDA's
   allocator peak; elsewhere the peak of live tensor bytes, `peak_tensor_bytes`); with `train_memory`,
   that of one training step on a copy (`train_mb`).
6. `compile` runs each plan through `compile_model`, `sdpa` allows one attention kernel alone.

The baseline is the plan "none"; it is always measured (first) and reported, listed or not. bfloat16
runs under `torch.autocast` or on a bfloat16 copy of the model, whichever is faster (`PRECISIONS`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InputError
from .flops import flops
from .reducers import REGISTRY, apply, parse
from .reducers.plan import current_plan, is_adaptive

if TYPE_CHECKING:
    from rich.table import Column, Table

    from .backbones.base import VideoBackbone

__all__ = [
    "BASELINE",
    "BUSY_SPREAD",
    "DTYPES",
    "PRECISIONS",
    "SDPA_BACKENDS",
    "BenchResult",
    "benchmark",
    "busy_warning",
    "check_compilable",
    "compact_table",
    "compile_model",
    "format_table",
    "host_syncs",
    "main_plans",
    "peak_tensor_bytes",
    "to_json",
    "with_baseline",
]

log = logging.getLogger(__name__)

BASELINE = "none"
"""The plan every other plan is compared with."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Compute dtypes `benchmark` accepts; "bfloat16" and "float16" run under `torch.autocast` or with the
weights converted (`PRECISIONS`), on CPU too (float16 is for GPUs: CPUs without native float16 run it
slowly)."""
PRECISIONS = ("auto", "autocast", "weights")
"""How `benchmark` runs bfloat16 or float16: float32 weights under `torch.autocast`, a converted copy of
the model (`model.to(torch.bfloat16)`: no casts at run time), or "auto": whichever runs the unreduced
model faster, timed first."""
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
"""Which fused attention kernel `benchmark` lets `scaled_dot_product_attention` use: "auto" (PyTorch's
choice) or one of them alone (`torch.nn.attention.sdpa_kernel`); "efficient" and "cudnn" are GPU-only."""
_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip

BUSY_SPREAD = 0.15
"""A result whose `spread` is above this was measured on a busy machine. On an idle 2-core CPU the
rounds of a plan disagree by 5-10% at batch 1 (`tokensieve bench --methods`, videomae-s) and less at
larger batches; 15% is past that, and is where a speed-up's second decimal (and an efficiency near
1) stops meaning anything."""


@dataclass(frozen=True)
class BenchResult:
    """Throughput of one plan at one batch size.

    Attributes:
        plan: the plan spec as given ("none" for the baseline).
        batch_size: clips per forward pass.
        dtype: "float32", "bfloat16" or "float16".
        precision: how a low-precision dtype ran: "autocast" or "weights" (a converted copy of the
            model); "" for float32.
        frames, size: input clip length and frame side.
        device: where the model ran ("cpu", "cuda:0", ...).
        threads: `torch.get_num_threads()` during the run.
        gflops: GFLOPs per clip with the plan installed (batch 1, float32; multiply-add = 1 FLOP).
        gflops_ratio: baseline GFLOPs / these GFLOPs (2.0 = half the compute).
        seconds: median wall-clock seconds per batch over the timed rounds.
        seconds_iqr: (first, third) quartile of the seconds per batch.
        times: every timed run, seconds per batch, in round order.
        clips_per_s: `batch_size / seconds`.
        speedup: clips/s over the baseline's clips/s at the same batch size (1.0 for the baseline).
        speedup_iqr: (first, third) quartile of the per-round paired ratios baseline time / time.
        reducer_share: median fraction of the forward time spent inside the plan's reducers (their
            own work: choosing and gathering tokens; what blocks record for them is block time); None
            under `compiled` (the reducers are inside the compiled graph).
        peak_mb: peak memory of one forward per clip, in MB (2**20 bytes), above what was allocated
            before it (the weights): on CUDA the allocator's peak, elsewhere the peak of the bytes held
            by live tensors (`peak_tensor_bytes`; kernels' own scratch space is not seen). None where
            it was not measured.
        train_mb: the same for one training step (forward in train mode, backward of the summed
            logits) per clip: the activations kept for the backward pass and its temporaries; the
            weights' gradients are allocated before it and not counted. None where not measured or
            where the plan cannot take a training step without labels.
        compiled: every plan ran through `compile_model`, one compiled copy per plan.
        sdpa: the attention kernel allowed (`SDPA_BACKENDS`; "auto": PyTorch's choice).
    """

    plan: str
    batch_size: int
    dtype: str
    frames: int
    size: int
    device: str
    threads: int
    gflops: float
    gflops_ratio: float
    seconds: float
    seconds_iqr: tuple[float, float]
    times: tuple[float, ...]
    clips_per_s: float
    speedup: float
    speedup_iqr: tuple[float, float]
    reducer_share: float | None = 0.0
    precision: str = ""
    peak_mb: float | None = None
    train_mb: float | None = None
    compiled: bool = False
    sdpa: str = "auto"

    @property
    def is_baseline(self) -> bool:
        return self.plan == BASELINE

    @property
    def efficiency(self) -> float:
        """speed-up / GFLOPs ratio: 1.0 when wall-clock time falls as much as the FLOPs do."""
        return self.speedup / self.gflops_ratio

    @property
    def spread(self) -> float:
        """How much the timed rounds disagree, as a fraction: the interquartile range of the per-round
        paired ratios over the speed-up (drift that slows both sides of a pair cancels), or for the
        baseline, which has no pair, of the seconds per batch over their median."""
        q1, q3 = self.seconds_iqr if self.is_baseline else self.speedup_iqr
        return (q3 - q1) / (self.seconds if self.is_baseline else self.speedup)


# ---------------------------------------------------------------------------------------- helpers
class _Mark:
    """A point in time on `device`: a CUDA event recorded in the current stream (no synchronisation:
    read it after one), elsewhere `time.perf_counter()` after synchronising."""

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.event: torch.cuda.Event | None = torch.cuda.Event(enable_timing=True)
            self.event.record()
            self.time = 0.0
        else:
            _sync(device)
            self.event, self.time = None, time.perf_counter()

    def until(self, end: _Mark) -> float:
        """Seconds from this mark to `end` (on CUDA, once the device has passed both)."""
        if self.event is not None and end.event is not None:
            return self.event.elapsed_time(end.event) / 1e3
        return end.time - self.time


class _ReducerClock:
    """Seconds spent inside reducer slots, through removable forward hooks (`_Mark`s: on a GPU, events
    in the stream, so the forward is not synchronised; read `seconds()` after synchronising)."""

    def __init__(self, modules: Sequence[nn.Module], device: torch.device) -> None:
        self._device = device
        self._spans: list[tuple[_Mark, _Mark]] = []
        self._start: _Mark | None = None
        self._handles = [h for m in modules for h in (
            m.register_forward_pre_hook(self._enter), m.register_forward_hook(self._exit))]  # fmt: skip

    def reset(self) -> None:
        self._spans.clear()

    def seconds(self) -> float:
        return sum(start.until(end) for start, end in self._spans)

    def _enter(self, *_: object) -> None:
        self._start = _Mark(self._device)

    def _exit(self, *_: object) -> None:
        assert self._start is not None
        self._spans.append((self._start, _Mark(self._device)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _LiveTensors(TorchDispatchMode):
    """Bytes held by the tensors the ops under it create, and their peak: each new storage is counted
    until it is freed (its weak reference expires; checked at every op)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.bytes -= self.live.pop(key)[1]
        given = {_storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in given:  # new memory, not a view or in place
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.bytes += storage.nbytes()
        self.peak = max(self.peak, self.bytes)
        return out


_SYNCING = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
    "unique_dim", "bincount", "equal",
})  # fmt: skip
"""Operators whose result the host must wait for: a Python number from a tensor, or an output whose shape
depends on the values (and `index` with a boolean mask, `repeat_interleave` without `output_size`)."""


class _SyncOps(TorchDispatchMode):
    def __init__(self, seen: collections.Counter[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name.partition("::")[2]
        if name in _SYNCING:
            self.seen[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.seen[f"{name} (boolean mask)"] += 1
        elif (
            name == "repeat_interleave"
            and func._overloadname == "Tensor"
            and (kwargs or {}).get("output_size") is None
        ):
            self.seen["repeat_interleave (no output_size)"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs() -> Iterator[collections.Counter[str]]:
    """Count the operations run under it that make the host wait for the device (on a GPU, a
    synchronisation that stalls the queue of kernels), by name: `.item()`, `bool(tensor)`, `.tolist()`,
    `nonzero`, boolean-mask indexing, `unique` and the like. Device-independent (it reads the operators,
    so a CPU run shows what a GPU run would wait for):

        with host_syncs() as seen:
            model(video)
        assert not seen, seen   # a fixed-budget plan keeps the GPU's queue full
    """
    seen: collections.Counter[str] = collections.Counter()
    tolist = Tensor.tolist

    def counted_tolist(self: Tensor) -> object:  # not an operator: seen here
        seen["tolist"] += 1
        return tolist(self)

    Tensor.tolist = counted_tolist  # type: ignore[method-assign]
    try:
        with _SyncOps(seen):
            yield seen
    finally:
        Tensor.tolist = tolist  # type: ignore[method-assign]


def _storage_key(t: Tensor) -> int:
    return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr()


def peak_tensor_bytes(run: Callable[[], object]) -> int:
    """The peak of the bytes held by tensors `run` creates (what it allocates and holds at once; the
    tensors alive before it, such as the weights, are not counted). Exact for tensors; kernels'
    scratch space and allocator caching are not seen. Slow (every op is intercepted): measure once."""
    with _LiveTensors() as tracker:
        run()
    return tracker.peak


def _peak_mb(run: Callable[[], None], device: torch.device) -> float:
    """Peak MB of one `run` above what was allocated before it: CUDA's allocator, else live tensors."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return peak_tensor_bytes(run) / 2**20


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0])
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q1, q3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _random_video(
    model: VideoBackbone, *, batch: int, frames: int, size: int, device: torch.device
) -> Tensor:
    """(batch, frames, C, size, size) float32 clips: uniform pixels normalised like the checkpoint."""
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(batch, frames, cfg.channels, size, size, generator=generator)
    mean = torch.tensor(cfg.mean).view(1, 1, -1, 1, 1)  # (1, 1, C, 1, 1)
    std = torch.tensor(cfg.std).view(1, 1, -1, 1, 1)
    return ((video - mean) / std).to(device)


def main_plans() -> list[str]:
    """Every registered method's main fixed-budget settings (`Reducer.main_settings`), by name."""
    return [spec for name in sorted(REGISTRY) for spec in REGISTRY[name].main_settings]


def with_baseline(plans: Sequence[str]) -> list[str]:
    """The plans to measure: "none" first, then the others once each, in order.

    Raises:
        ValueError: a bad spec, before anything is built or measured.
    """
    for spec in plans:
        parse(spec)
    return [BASELINE, *(p for p in dict.fromkeys(plans) if p.strip() != BASELINE)]


def _check_args(*, plans: Sequence[str], batch_sizes: Sequence[int], dtype: str, threads: int | None,
                warmup: int, repeats: int) -> None:  # fmt: skip
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(map(repr, DTYPES))}; got {dtype!r}")
    if isinstance(plans, str):
        raise InputError(f"plans is a sequence of specs, e.g. [{plans!r}], not one string")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1 (or None to keep torch's setting), got {threads}")
    if warmup < 0 or repeats < 1:
        raise InputError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")


def _timed_rounds(num_plans: int, *, install: Callable[[int], None], run: Callable[[], None], warmup: int,
                  repeats: int, device: torch.device, label: str,
                  clock: _ReducerClock) -> tuple[list[list[float]], list[list[float]]]:  # fmt: skip
    """Seconds of `run` under each plan in each of `repeats` interleaved rounds, after `warmup`
    untimed rounds, and the seconds spent in reducers during each run. `install(i)` puts plan i in
    place (outside the timed region).

    Round r runs the plans starting at plan r mod P, so none always follows the same neighbour.
    """
    times: list[list[float]] = [[] for _ in range(num_plans)]
    in_reducers: list[list[float]] = [[] for _ in range(num_plans)]
    for r in range(warmup + repeats):
        timed = r >= warmup
        if timed:
            log.info("%s: round %d/%d", label, r - warmup + 1, repeats)
        elif r == 0:
            log.info("%s: warm-up (%d rounds)", label, warmup)
        for i in range(num_plans):
            j = (i + r) % num_plans
            install(j)
            clock.reset()
            _sync(device)
            start = _Mark(device)
            # Compiled plans compile in the warm-up; a compilation in a timed round is an error, not a time.
            with torch.compiler.set_stance("fail_on_recompile") if timed else contextlib.nullcontext():
                run()
            end = _Mark(device)
            _sync(device)
            if timed:
                times[j].append(start.until(end))
                in_reducers[j].append(clock.seconds())
    return times, in_reducers


# ---------------------------------------------------------------------------------------- benchmark
def benchmark(
    model: VideoBackbone,
    *,
    plans: Sequence[str] = (BASELINE,),
    batch_size: int | Sequence[int] = 1,
    dtype: str = "float32",
    precision: str = "auto",
    threads: int | None = None,
    frames: int | None = None,
    size: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    memory: bool = True,
    train_memory: bool = False,
    compile: bool = False,
    sdpa: str = "auto",
) -> list[BenchResult]:
    """Clips per second of `model` under each plan, with the baseline ("none") measured alongside.

    The model runs where its parameters are (float32 weights). Plans are installed with
    `tokensieve.apply` (learned reducers start from fresh weights: timing does not depend on them
    for fixed-budget methods); whatever plan the model held before is put back afterwards, as is its
    train/eval mode and torch's thread count.

    Args:
        model: a tokensieve backbone.
        plans: plan specs to measure. "none" is added first when absent.
        batch_size: clips per forward pass, or several batch sizes (one row per plan and size).
        dtype: "float32", "bfloat16" or "float16".
        precision: how a low-precision dtype runs (`PRECISIONS`): "autocast" (float32 weights under
            `torch.autocast`), "weights" (a converted copy of the model; `model` is left as it is), or
            "auto" (default): both time the unreduced model at the first batch size (interleaved,
            after `warmup`), and the faster one runs everything; the results say which.
        threads: `torch.set_num_threads` for the duration; None keeps the current setting.
        frames, size: input clip length and frame side; default the model's configured input.
        warmup: untimed rounds before timing (each round runs every plan once).
        repeats: timed rounds; the median is reported.
        memory: also measure each plan's peak memory per clip (`BenchResult.peak_mb`), in one extra
            untimed forward per plan and batch size (not on CPU under `compile`: the live-tensor
            count would run the compiled graph eagerly).
        train_memory: also measure the peak memory of one training step per plan and batch size
            (`BenchResult.train_mb`), on a copy of the model in train mode.
        compile: run every plan through `compile_model` of a copy of the model with that plan
            installed (one compiled copy per plan; the first run at each batch size, in the warm-up,
            compiles; a compilation in a timed round is an error). The reducer share is not measured
            then (None).
        sdpa: the attention kernel `scaled_dot_product_attention` may use (`SDPA_BACKENDS`): "auto", or
            one alone (an `InputError` before anything is timed when it cannot run the model's heads here).

    Returns:
        One `BenchResult` per batch size and plan, grouped by batch size, each group baseline first.

    Raises:
        ValueError: a bad spec (naming the valid methods), dtype (naming the valid ones), batch size,
            thread count, warmup/repeats, or an input the model does not fit.
    """
    batch_sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    plans = list(plans) if not isinstance(plans, str) else plans
    _check_args(
        plans=plans, batch_sizes=batch_sizes, dtype=dtype, threads=threads, warmup=warmup, repeats=repeats
    )
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    if sdpa not in SDPA_BACKENDS:
        raise InputError(f"sdpa must be one of {', '.join(map(repr, SDPA_BACKENDS))}; got {sdpa!r}")
    specs = with_baseline(plans)
    param = next(model.parameters())
    if param.device.type == "meta":
        raise InputError("cannot time a model on the meta device; use tokensieve.flops to count it")
    if param.dtype != torch.float32:
        raise InputError(
            f"benchmark expects float32 weights (dtype='bfloat16' runs a bfloat16 copy or autocast), got {param.dtype}"
        )
    device = param.device
    frames = frames or model.config.frames
    size = size or model.config.size
    grid = model.config.grid_of(frames, size)  # the plans are checked for these clips (`apply(grid=)`)

    original, was_training = current_plan(model), model.training
    model.eval()
    results: list[BenchResult] = []
    try:
        with _num_threads(threads) as num_threads, contextlib.ExitStack() as stack:
            if sdpa != "auto":
                stack.enter_context(sdpa_kernel(_SDPA[sdpa]))
                _check_kernel(sdpa, model, DTYPES[dtype], device)
            sample = _random_video(model, batch=1, frames=frames, size=size, device=device)
            gflops: list[float] = []
            for spec in specs:
                apply(model, spec, grid=grid)
                log.info("counting GFLOPs of plan %r", spec)
                gflops.append(float(flops(model, video=sample)))
            net = model
            if dtype == "float32":
                precision = ""
            elif precision != "autocast":  # a copy: converting the caller's weights back would round them
                apply(model, BASELINE)
                low = copy.deepcopy(model).to(DTYPES[dtype])
                if precision == "auto":
                    first = _random_video(
                        model, batch=batch_sizes[0], frames=frames, size=size, device=device
                    )
                    precision = _faster_precision(model, low, first, warmup=warmup, device=device)
                net = low if precision == "weights" else model
            autocast = functools.partial(
                torch.autocast, device.type, dtype=DTYPES[dtype], enabled=precision == "autocast"
            )
            if compile:  # one compiled copy per plan: each keeps its own graphs, and none is recompiled
                graphs = len(specs) * len(batch_sizes)  # all of them kept: none falls back to eager
                stack.enter_context(torch._dynamo.config.patch(
                    recompile_limit=max(graphs, torch._dynamo.config.recompile_limit),
                    accumulated_recompile_limit=max(graphs, torch._dynamo.config.accumulated_recompile_limit),
                ))  # fmt: skip
                eager = [copy.deepcopy(net) for _ in specs]
                installed = [apply(twin, spec, grid=grid) for twin, spec in zip(eager, specs, strict=True)]
                nets: list[Callable[[Tensor], Tensor]] = [compile_model(twin) for twin in eager]
            else:  # one model, its plans swapped between runs
                installed = [apply(net, spec, grid=grid) for spec in specs]
                eager = [net] * len(specs)
                nets = list(eager)
            current = [0]

            def install(i: int) -> None:
                if not compile:
                    installed[i].install()
                current[0] = i

            def run(video: Tensor) -> None:
                with torch.inference_mode(), autocast():
                    nets[current[0]](video)

            # Under torch.compile the hooks would sit inside the compiled graph: no reducer clock there.
            clock = _ReducerClock([] if compile else [m for plan in installed for m in plan.slots], device)
            for batch in batch_sizes:
                video = _random_video(model, batch=batch, frames=frames, size=size, device=device)
                video = video.to(next(net.parameters()).dtype)
                times, in_reducers = _timed_rounds(
                    len(specs), install=install, run=functools.partial(run, video),
                    warmup=max(warmup, 1) if compile else warmup, repeats=repeats, device=device,
                    label=f"batch {batch}, {len(specs)} plan(s)", clock=clock,
                )  # fmt: skip
                base = statistics.median(times[0])
                peaks: list[float | None] = [None] * len(specs)
                trains: list[float | None] = [None] * len(specs)
                for i in range(len(specs)):
                    install(i)
                    if memory and (device.type == "cuda" or not compile):  # compiled: CUDA's allocator only
                        log.info("batch %d, %s: peak memory", batch, specs[i])
                        peaks[i] = _peak_mb(functools.partial(run, video), device) / batch
                    if train_memory:
                        log.info("batch %d, %s: peak memory of a training step", batch, specs[i])
                        trains[i] = _train_peak_mb(eager[i], video, autocast, device)
                for spec, flop, runs_s, reducer_s, peak, train in zip(
                    specs, gflops, times, in_reducers, peaks, trains, strict=True
                ):
                    seconds = statistics.median(runs_s)
                    paired = [b / t for b, t in zip(times[0], runs_s, strict=True)]
                    results.append(
                        BenchResult(
                            plan=spec, batch_size=batch, dtype=dtype, frames=frames, size=size,
                            device=str(device), threads=num_threads, gflops=flop,
                            gflops_ratio=gflops[0] / flop if flop else float("inf"),
                            seconds=seconds, seconds_iqr=_quartiles(runs_s), times=tuple(runs_s),
                            clips_per_s=batch / seconds, speedup=base / seconds,
                            speedup_iqr=_quartiles(paired),
                            reducer_share=None if compile else statistics.median(
                                a / t for a, t in zip(reducer_s, runs_s, strict=True)),
                            precision=precision, peak_mb=peak, train_mb=train, compiled=compile, sdpa=sdpa,
                        )
                    )  # fmt: skip
                    log.info("batch %d, %s: %.1f ms/batch, %.2fx", batch, spec, 1e3 * seconds, base / seconds)
            clock.remove()
        if warning := busy_warning(results):
            log.warning("%s", warning)
    finally:
        original.install()
        model.train(was_training)
    return results


def _check_kernel(sdpa: str, model: VideoBackbone, dtype: torch.dtype, device: torch.device) -> None:
    """An `InputError` when attention kernel `sdpa` (the only one allowed) cannot run `model`'s heads in
    `dtype` here (PyTorch's "No viable backend" would otherwise end the run mid-way)."""
    cfg = model.config
    q = torch.zeros(1, cfg.heads, 8, cfg.dim // cfg.heads, dtype=dtype, device=device)
    try:
        with torch.inference_mode():
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as err:
        raise InputError(
            f"sdpa={sdpa!r}: PyTorch has no {sdpa} attention kernel for {dtype} heads of width "
            f"{cfg.dim // cfg.heads} on {device} ({str(err).splitlines()[0]})"
        ) from None


def check_compilable(model: VideoBackbone) -> None:
    """An `InputError` unless `model`'s plan can run compiled: not an adaptive plan (per-clip budgets: its
    token counts, so its shapes, change from batch to batch, and it reads them back from the device),
    and no reducer that reads the labels (the oracle's gradient pass, LITE's training target)."""
    if is_adaptive(model):
        raise InputError(
            f"{model.spec}: a per-clip budget changes its shapes per clip, so from batch to batch; compile "
            "runs fixed-budget plans (run this one eagerly)"
        )
    if any(r.wants_labels for r in model.plan):
        raise InputError(
            f"{model.spec} reads the labels; compile runs plans without them (run this one eagerly)"
        )


def compile_model(model: VideoBackbone) -> Callable[[Tensor], Tensor]:
    """`model` (with its installed plan) compiled for inference: `torch.compile(model, dynamic=False)`,
    run with inductor's freezing (the weights become constants of the graph: on CPU the matrix products
    take pre-packed weights and fuse their bias and activation). One graph per input shape, compiled at
    its first call; another batch of the same shape never recompiles (fixed budgets have no
    value-dependent shapes: tests/test_reducers.py). Compile again after changing the weights or the plan.

        forward = ts.bench.compile_model(model)
        logits = forward(video)            # under torch.inference_mode() or torch.no_grad()

    Raises:
        InputError: a plan `check_compilable` refuses.
    """
    check_compilable(model)
    graph = torch.compile(model, dynamic=False)

    def forward(video: Tensor) -> Tensor:
        with torch._inductor.config.patch(freezing=True):
            return graph(video)

    return forward


def _train_peak_mb(
    net: nn.Module,
    video: Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
    device: torch.device,
) -> float | None:
    """Peak MB per clip of one training step (forward in train mode under `autocast`, backward of the
    summed logits) on a copy of `net` with its plan, after a first step has allocated the gradients
    (zeroed in place, not counted). The caller's model and its gradients are not touched."""
    twin = copy.deepcopy(net).train()

    def step() -> None:
        with autocast():
            out = twin(video)
        out.float().sum().backward()

    try:
        step()
        for param in twin.parameters():
            if param.grad is not None:
                param.grad.zero_()
        return _peak_mb(step, device) / video.shape[0]
    except InputError as err:  # e.g. a plan whose training needs the labels
        log.info("no training step without labels: %s", err)
        return None


def _faster_precision(
    model: VideoBackbone, low: VideoBackbone, video: Tensor, *, warmup: int, device: torch.device
) -> str:
    """ "autocast" or "weights": which runs faster in `low`'s dtype on `video`, `model` (float32) under
    autocast or `low` (its converted copy), by the median of 3 interleaved rounds (`_timed_rounds`)
    after `warmup` (at least 1)."""
    dtype = next(low.parameters()).dtype
    names = ("autocast", "weights")
    runs = {"autocast": functools.partial(model, video), "weights": functools.partial(low, video.to(dtype))}
    current = [names[0]]

    def run() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype, enabled=current[0] == "autocast"),
        ):
            runs[current[0]]()

    times, _ = _timed_rounds(
        len(names), install=lambda i: current.__setitem__(0, names[i]), run=run, warmup=max(1, warmup),
        repeats=3, device=device, label="autocast or converted weights", clock=_ReducerClock([], device),
    )  # fmt: skip
    median = {name: statistics.median(t) for name, t in zip(names, times, strict=True)}
    chosen = min(median, key=median.__getitem__)
    name = str(dtype).removeprefix("torch.")
    log.info("%s: %s (autocast %.1f ms, %s weights %.1f ms per batch of %d)", name,
             f"{name} weights" if chosen == "weights" else "autocast", 1e3 * median["autocast"], name,
             1e3 * median["weights"], video.shape[0])  # fmt: skip
    return chosen


# ---------------------------------------------------------------------------------------- output
def busy_warning(results: Sequence[BenchResult]) -> str | None:
    """One line saying the machine was busy, naming the result whose rounds disagree most, when its
    `spread` is above `BUSY_SPREAD`; None when every result is within it."""
    worst = max(results, key=lambda r: r.spread, default=None)
    if worst is None or not worst.spread > BUSY_SPREAD:
        return None
    noisy = sum(r.spread > BUSY_SPREAD for r in results)
    what = "seconds per batch" if worst.is_baseline else "speed-up"
    return (
        f"the machine was busy: timed rounds disagree by more than {BUSY_SPREAD:.0%} (IQR / median) in "
        f"{noisy} of {len(results)} results, most in the {what} of {worst.plan!r} at batch {worst.batch_size} "
        f"({worst.spread:.0%}); measure on an idle machine"
    )


def _environment() -> dict[str, object]:
    from . import __version__

    return {"tokensieve": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or None}  # fmt: skip


def to_json(
    results: Sequence[BenchResult], *, meta: Mapping[str, object] | None = None, indent: int = 2
) -> str:
    """Results as a JSON document: `{"environment": {...}, **meta, "results": [{...}, ...]}`.

    Every `BenchResult` field is a key of its result object (tuples become lists), plus `efficiency`
    and `spread`. `"busy"` holds `busy_warning(results)`: null, or the line saying the machine was busy.
    """
    rows = [{**asdict(r), "efficiency": r.efficiency, "spread": r.spread} for r in results]
    doc = {"environment": _environment(), **(meta or {}), "busy": busy_warning(results), "results": rows}
    return json.dumps(doc, indent=indent)


def _fmt(value: float) -> str:
    """Four significant digits at most, without switching to exponents for tiny test models."""
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"


def compact_table(*columns: str | Column, title: str | None = None) -> Table:
    """A borderless table with a rule under the header that fits 80 columns."""
    from rich import box
    from rich.table import Table

    return Table(
        *columns,
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=0,  # the box draws a blank rule between columns: one space
        pad_edge=False,
    )


PLAN_WIDTH = 24
"""A plan longer than this is shown one method per line in `format_table`."""


def format_table(results: Sequence[BenchResult], *, title: str | None = None) -> Table:
    """A `rich.table.Table` of results: one row per plan and batch size, the baseline rows dimmed.
    The dtype belongs in the title (a column appears only when results mix dtypes). "MB / clip" is the
    peak memory of a forward per clip (`BenchResult.peak_mb`), when measured; "train MB/clip" that of
    a training step (`BenchResult.train_mb`), when measured (the GFLOPs ratio column then makes room).

    "IQR" is each result's `spread` as a percentage: the interquartile range of the per-round
    speed-ups over the speed-up (of the seconds over their median for the baseline, which has no
    pair). A speed-up closer to 1 than that is within the noise of the run; above `BUSY_SPREAD` the
    machine was busy (`busy_warning`).
    """
    table = compact_table(title=title)
    # A plan up to `PLAN_WIDTH` is never cut; a longer one folds (one method per line, then within a method)
    # rather than push the numbers out of 80 columns.
    short = [len(r.plan) for r in results if len(r.plan) <= PLAN_WIDTH]
    table.add_column("plan", overflow="fold", min_width=max(short, default=4))
    memory = any(r.peak_mb is not None for r in results)
    train = any(r.train_mb is not None for r in results)
    # Seconds per batch are in the JSON (batch / clips/s): the table fits 80 columns without them, and
    # without the GFLOPs ratio (speed-up / efficiency; in the JSON) when it shows training memory too.
    headers = (
        "batch",
        "GFLOPs",
        *(() if train else ("GFLOPs\nratio",)),
        "clips/s",
        "speed-\nup",
        "effi-\nciency",
        "reducer\nshare",
        "IQR",
    )
    for name in headers:
        table.add_column(name, justify="right")
    if memory:
        table.add_column("MB /\nclip", justify="right")
    if train:
        table.add_column("train\nMB/clip", justify="right")
    if len({r.dtype for r in results}) > 1:
        table.add_column("dtype")
    for r in results:
        table.add_row(
            r.plan.replace("+", "+\n") if len(r.plan) > PLAN_WIDTH else r.plan,
            str(r.batch_size), _fmt(r.gflops), *(() if train else (f"{r.gflops_ratio:.2f}x",)),
            _fmt(r.clips_per_s), f"{r.speedup:.2f}x", f"{r.efficiency:.2f}",
            f"{100 * r.reducer_share:.1f}%" if r.reducer_share is not None else "-", f"{100 * r.spread:.1f}%",
            *([_fmt(r.peak_mb) if r.peak_mb is not None else "-"] if memory else []),
            *([_fmt(r.train_mb) if r.train_mb is not None else "-"] if train else []),
            *([r.dtype] if len({x.dtype for x in results}) > 1 else []),
            style="dim" if r.is_baseline and len(results) > 1 else None,
        )  # fmt: skip
    return table
