"""Memory measurement for training: bytes autograd saves for backward, peak tensor memory, exact byte accounting.

* :class:`SavedTensorMeter` counts what autograd keeps alive between forward and backward
  (``torch.autograd.graph.saved_tensors_hooks``): one entry per distinct storage, parameters excluded, each storage
  attributed to the innermost module that was running when it was saved.
* :func:`peak_memory_bytes` runs a function and returns the peak of live tensor bytes it allocated: on CUDA with
  ``torch.cuda.max_memory_allocated``, on CPU from the allocation events of ``torch.profiler`` (exact sizes, so the
  number is deterministic, unlike the process's resident set size).
* :func:`tensor_bytes`, :func:`optimizer_state_bytes`: exact byte counts of tensors (each storage once).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def tensor_bytes(tensors: Iterable) -> int:
    """Bytes of the distinct storages behind ``tensors`` (nested lists/tuples/dicts allowed; non-tensors ignored)."""
    seen: dict[int, int] = {}

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.nbytes():
                seen[st.data_ptr()] = st.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(tensors)
    return int(sum(seen.values()))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes held by an optimizer's per-parameter state (moments, scales, step counters)."""
    return tensor_bytes([dict(s) for s in optimizer.state.values()])


def param_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return tensor_bytes([p for p in model.parameters() if p.requires_grad or not trainable_only])


@dataclass
class SavedRecord:
    scope: str  # qualified name of the innermost module running when the tensor was saved
    kind: str  # that module's class name
    dtype: str
    numel: int
    nbytes: int  # bytes of the whole storage kept alive


class SavedTensorMeter:
    """Count the activation bytes autograd saves for backward during a forward pass.

    Use as a context manager around the forward (the backward may run outside)::

        with SavedTensorMeter(model) as meter:
            loss = model(x).sum()
        meter.total_bytes, meter.bytes_by_kind()

    Each storage is counted once (views and tensors shared by several ops are not double-counted) at its full size,
    since that is what stays allocated. Storages of ``model``'s parameters (and of ``exclude``) are not activations
    and are skipped.
    """

    def __init__(self, model: torch.nn.Module | None = None, exclude: Iterable[torch.Tensor] = ()):
        self.model = model
        params = list(model.parameters()) if model is not None else []
        self._skip = {_storage_key(t) for t in [*params, *exclude]}
        self._seen: set[int] = set()
        self.records: list[SavedRecord] = []
        self._stack: list[tuple[str, str]] = [("", "")]
        self._handles: list = []
        self._hooks = None

    # ---- module scope tracking ----
    def _pre(self, name: str, kind: str):
        def hook(module, args):
            self._stack.append((name, kind))
        return hook

    def _post(self, module, args, output):
        if len(self._stack) > 1:
            self._stack.pop()

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.numel():
            key = _storage_key(t)
            if key not in self._skip and key not in self._seen:
                self._seen.add(key)
                scope, kind = self._stack[-1]
                self.records.append(SavedRecord(scope, kind, str(t.dtype).replace("torch.", ""), t.numel(),
                                                t.untyped_storage().nbytes()))
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        if self.model is not None:
            for name, mod in self.model.named_modules():
                kind = type(mod).__name__
                self._handles.append(mod.register_forward_pre_hook(self._pre(name, kind)))
                self._handles.append(mod.register_forward_hook(self._post))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    # ---- summaries ----
    @property
    def total_bytes(self) -> int:
        return int(sum(r.nbytes for r in self.records))

    def bytes_where(self, predicate: Callable[[SavedRecord], bool]) -> int:
        return int(sum(r.nbytes for r in self.records if predicate(r)))

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            out[r.kind or "<top>"] += r.nbytes
        return dict(sorted(out.items()))

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            out[r.dtype] += r.nbytes
        return dict(sorted(out.items()))


def _cpu_peak_from_profiler(prof) -> int:
    """Peak of (allocated - freed) bytes over the allocation events of a finished CPU profile."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    events.sort(key=lambda a: a[0])
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return int(peak)


def peak_memory_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Run ``fn()`` and return the peak of tensor bytes it had allocated at any moment, above what was live before.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: replay of the profiler's allocation/free events (exact
    allocation sizes, deterministic for a deterministic ``fn``). Tensors alive before the call (parameters,
    optimizer state) are not included: add them with :func:`tensor_bytes`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _cpu_peak_from_profiler(prof)


def step_memory(model: torch.nn.Module, forward_loss: Callable[[], torch.Tensor],
                groups: dict[str, Callable[[SavedRecord], bool]] | None = None) -> dict:
    """Memory of one training step (forward + backward) of ``model``: bytes autograd saved (total, by module class,
    by dtype and for each predicate in ``groups``) and the peak of tensor bytes allocated during the step
    (activations, temporaries, gradients). Gradients are cleared afterwards."""
    model.zero_grad(set_to_none=True)
    with SavedTensorMeter(model) as meter:
        loss = forward_loss()
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss

    def step():
        forward_loss().backward()

    peak = peak_memory_bytes(step, next(model.parameters()).device)
    model.zero_grad(set_to_none=True)
    return {"saved_bytes": meter.total_bytes, "saved_by_kind": meter.bytes_by_kind(),
            "saved_by_dtype": meter.bytes_by_dtype(), "peak_bytes": peak,
            "saved_by_group": {k: meter.bytes_where(f) for k, f in (groups or {}).items()}}
