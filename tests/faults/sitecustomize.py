"""Test-only faults for worker-group ranks, installed at interpreter start (never in production).

A test puts this folder first on the workers' `PYTHONPATH` (see `faults.fault_env`); Python
then imports this module in every rank before `evalfleet.runtime.rank` runs, and it wraps the
rank's loading and computing with the fault named in `EVALFLEET_TEST_FAULT`:

- `swap_tp_shards`: every TP rank takes its neighbour's shard of one weight;
- `drop_pp_mask`: the last pipeline stage loses the padding (mask and position ids);
- `rotate_pp_microbatches`: the last pipeline stage merges its micro-batches' outputs in the
  wrong order (the first one last);
- `oom_above:N`: every batch of more than N padded tokens fails as out of memory (planted);
- `oom_at_load`: loading fails as out of memory;
- `rlimit:RANK:MB`: once loaded, rank RANK may grow its writable memory (RLIMIT_DATA) by only
  MB megabytes, so a large enough batch fails a *real* allocation;
- `slow_batch:SECONDS`: every batch takes that much longer, so a test can act mid-job (remove
  a Ray node).
- `crash_on_token:T`: a rank SIGKILLs itself on any batch that holds a request whose context
  contains token id T (a poison request: it crashes every replica that computes it).
- `chaos:SECONDS:PATH`: every batch takes SECONDS longer (a window for the chaos soak to act
  in), and the first batch of two or more requests that any rank starts after the file PATH
  appears fails as out of memory, once (that rank deletes the file): an out-of-memory at a
  moment the soak chooses (`benchmarks/chaos.py`), on a batch that halving can split (one
  request out of memory fails its job by design).
- `fake_cuda:NAME:GIB:BF16`: torch.cuda reports one GPU named NAME with GIB GiB that runs
  bfloat16 if BF16 is 1 (the CUDA boundary only: availability, name, memory, bf16 support), so
  the rank decides its device and dtype as on that GPU; its weights then load in that dtype into
  the CPU's memory, since there is no GPU to allocate on.
- `oom_in_decode_once:MARKER`: the first decode step of two or more rows that any rank takes
  while the file MARKER is missing creates it and fails with the CPU allocator's out-of-memory
  error (planted, not a real allocation failure), once: out of memory mid-stream.
- `hang_batch_once:AFTER:MARKER`: the first rank to reach its batch number AFTER + 1 creates the
  file MARKER and never finishes that batch (its heartbeats go on: a hung batch, not a dead
  process); once MARKER exists every batch runs normally, so the job's retry succeeds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

FAULT = os.environ.get("EVALFLEET_TEST_FAULT", "")


def _data_bytes() -> int:
    """This process's writable private memory (VmData), what RLIMIT_DATA limits."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmData:"))
    return int(line.split()[1]) * 1024


def _fake_cuda(name: str, gib: str, bf16: str) -> None:
    """torch.cuda answers as one GPU of this name, memory and bf16 support would; nothing is allocated."""
    import types

    import torch

    total = int(float(gib) * 2**30)
    properties = types.SimpleNamespace(name=name, total_memory=total, major=8 if bf16 == "1" else 7, minor=0)
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: bf16 == "1"
    torch.cuda.get_device_name = lambda *args: name
    torch.cuda.get_device_properties = lambda *args: properties
    torch.cuda.mem_get_info = lambda *args: (total, total)
    torch.cuda.memory_allocated = lambda *args: 0


def _fail_one_decode_step(marker: str) -> None:
    from evalfleet.runtime.backends import decode

    step = decode.ContinuousDecoder._step

    def failing_step(self):
        if len(self.active) > 1 and not os.path.exists(marker):
            try:
                open(marker, "x").close()
            except FileExistsError:
                pass
            else:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1048576 bytes (test fault)")
        return step(self)

    decode.ContinuousDecoder._step = failing_step


def _install() -> None:
    import resource

    import torch
    import torch.distributed as dist

    from evalfleet.runtime import parallel, runner
    from evalfleet.runtime.backends.base import OutOfMemory

    rank = int(os.environ["EVALFLEET_WORKER_RANK"])
    load_part, compute = parallel.load_part, runner.compute
    if FAULT.startswith("fake_cuda:") and os.environ.get("CUDA_VISIBLE_DEVICES") != "":  # "": no GPU for this rank
        _fake_cuda(*FAULT.split(":", 1)[1].rsplit(":", 2))
    if FAULT.startswith("oom_in_decode_once:"):
        _fail_one_decode_step(FAULT.split(":", 1)[1])

    @torch.no_grad()
    def faulty_load(spec):
        if FAULT == "oom_at_load":
            raise torch.OutOfMemoryError("test fault: out of memory at load")
        if FAULT.startswith("fake_cuda:") and spec.device == "cuda":
            spec = dataclasses.replace(spec, device="cpu")  # the decided dtype, in the CPU's memory
        part = load_part(spec)
        model = part.backend.model
        if FAULT == "swap_tp_shards" and spec.tp > 1:
            local = next(
                parallel.local_tensor(p)
                for n, p in model.named_parameters()
                if "mlp" in n and parallel.local_tensor(p).shape != p.shape
            )
            shards = [torch.empty_like(local) for _ in range(spec.tp)]
            dist.all_gather(shards, local.contiguous(), group=part.tp_group)
            local.copy_(shards[(part.tp_rank + 1) % spec.tp])
        elif FAULT == "drop_pp_mask" and spec.pp > 1 and part.stage == spec.pp - 1:
            base = getattr(model, model.base_model_prefix)
            forward = base.forward

            def forward_without_mask(*args, **kwargs):
                kwargs["attention_mask"] = kwargs["position_ids"] = None  # transformers rebuilds it from positions
                return forward(*args, **kwargs)

            base.forward = forward_without_mask
        elif FAULT == "rotate_pp_microbatches" and spec.pp > 1 and part.stage == spec.pp - 1:
            backend = part.backend
            schedule = backend._schedule

            def rotating_schedule(ids, keep, size, count):
                real = schedule(ids, keep, size, count)
                step = real.step

                def rotated(*args, **kwargs):
                    chunks = step(*args, **kwargs).split(size)
                    return torch.cat([*chunks[1:], chunks[0]])

                real.step = rotated
                return real

            backend._schedule = rotating_schedule
        elif FAULT.startswith("rlimit:"):
            _, limited_rank, megabytes = FAULT.split(":")
            if int(limited_rank) == rank:
                limit = _data_bytes() + int(megabytes) * 2**20
                resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
        return part

    batches = 0

    def faulty_compute(backend, items, stream=None):
        nonlocal batches
        batches += 1
        if FAULT.startswith("hang_batch_once:"):
            _, after, marker = FAULT.split(":", 2)
            if batches > int(after) and not os.path.exists(marker):
                try:
                    open(marker, "x").close()  # one rank of one attempt hangs, the others go on
                except FileExistsError:
                    pass
                else:
                    threading.Event().wait()
        if FAULT.startswith("slow_batch:"):
            time.sleep(float(FAULT.split(":", 1)[1]))
        if FAULT.startswith("crash_on_token:"):
            token = int(FAULT.split(":", 1)[1])
            if any(token in item.context for item in items):
                os.kill(os.getpid(), signal.SIGKILL)
        if FAULT.startswith("chaos:"):
            _, seconds, trigger = FAULT.split(":", 2)
            time.sleep(float(seconds))
            if len(items) > 1:
                try:
                    os.unlink(trigger)  # only the rank that deletes the trigger fails
                except FileNotFoundError:
                    pass
                else:
                    raise OutOfMemory("test fault: out of memory on demand")
        if FAULT.startswith("oom_above:"):
            padded = len(items) * max(item.length for item in items)
            if padded > int(FAULT.split(":", 1)[1]):
                raise OutOfMemory(f"test fault: {padded} tokens")
        return compute(backend, items, stream)

    parallel.load_part = faulty_load
    runner.compute = faulty_compute


if FAULT and "EVALFLEET_WORKER_RANK" in os.environ:
    _install()
