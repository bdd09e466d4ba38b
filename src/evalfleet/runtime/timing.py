"""Rank side: timing the model's own collectives inside a rank.

`CommunicationTimer` wraps torch.distributed's entry points, so tensor-parallel all-reduces
and pipeline transfers are counted; the control traffic goes through torch's internal
`distributed_c10d` functions, which are not wrapped, so it never counts as model traffic.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_DIST_FUNCTIONS = {
    "all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast": "broadcast",
    "batch_isend_irecv": "p2p",
    "send": "p2p",
    "recv": "p2p",
}
_FUNCOL_FUNCTIONS = {
    "all_reduce": "all_reduce",
    "all_gather_single": "all_gather",
    "all_gather_tensor": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast": "broadcast",
}


@dataclass
class CommunicationTotals:
    """One rank's traffic of one kind during one batch."""

    kind: str
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "calls": self.calls, "bytes": self.bytes, "seconds": self.seconds}


def _tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    tensor = getattr(value, "tensor", None)  # a P2POp
    return _tensor_bytes(tensor) if tensor is not None else 0


class CommunicationTimer:
    """Counts bytes and wall seconds of the model's collectives in this process.

    A collective's time is the transfer's, not the launch's: functional collectives are waited
    for inside the wrapper, the pipeline's async sends and receives are timed when their caller
    waits on them, and on CUDA the device is synchronised around each call. `take()` returns
    and resets the totals of one batch.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self._synchronize = synchronize or (lambda: None)
        self._totals: dict[str, CommunicationTotals] = {}
        self._installed: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        for module, names in ((dist, _DIST_FUNCTIONS), (funcol, _FUNCOL_FUNCTIONS)):
            for name, kind in names.items():
                original = getattr(module, name, None)
                if original is not None:
                    self._installed.append((module, name, original))
                    setattr(module, name, self._wrap(original, kind))

    def uninstall(self) -> None:
        for module, name, original in reversed(self._installed):
            setattr(module, name, original)
        self._installed.clear()

    def _wrap(self, original: Callable[..., Any], kind: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._synchronize()
            started = time.perf_counter()
            result = original(*args, **kwargs)
            if type(result).__name__ == "AsyncCollectiveTensor":
                result = result.wait()
            self._synchronize()
            payload = _tensor_bytes(args[0]) if args else _tensor_bytes(next(iter(kwargs.values()), None))
            self.add(kind, payload, time.perf_counter() - started)
            if isinstance(result, list):  # batch_isend_irecv: the caller waits; time that too
                return [_TimedWork(work, self, kind) for work in result]
            return result

        return timed

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        totals = self._totals.setdefault(kind, CommunicationTotals(kind))
        totals.calls += 1
        totals.bytes += nbytes
        totals.seconds += seconds

    def take(self) -> list[dict[str, Any]]:
        taken = [totals.as_dict() for totals in self._totals.values()]
        self._totals = {}
        return taken


class _TimedWork:
    """An async transfer whose `wait()` adds its seconds to the timer (the caller waits exactly once)."""

    def __init__(self, work: Any, timer: CommunicationTimer, kind: str) -> None:
        self._work, self._timer, self._kind = work, timer, kind

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        done = self._work.wait(*args, **kwargs)
        totals = self._timer._totals.setdefault(self._kind, CommunicationTotals(self._kind))
        totals.seconds += time.perf_counter() - started
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)
