"""Check the monitor on a real GPU: run a CUDA matmul load for ~20 s while it samples, and show
that utilization rose and memory grew. Not a test (tests never need a GPU); run it by hand:

    .venv/bin/python scripts/gpu_monitor_check.py OUT.json [--seconds 20] [--load-python PYTHON]

The load runs in a child process under the first Python whose torch can use CUDA (this
interpreter, `python3`, or --load-python), so evalfleet's CPU-only virtualenv can still watch.
OUT.json gets the snapshots (before, during, after), the checks, and the monitor's summary;
monitoring.json and monitoring.png are written next to it. Prints PASS or FAIL with figures;
exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from evalfleet.monitoring import MultiGPUPerformanceMonitor, render_prometheus

GIB = 1024**3
LOAD = """
import sys, time, torch
seconds = float(sys.argv[1])
device = torch.device("cuda")
a = torch.randn(8192, 8192, device=device)
b = torch.randn(8192, 8192, device=device)
ballast = torch.empty(int(4 * 1024**3), dtype=torch.uint8, device=device)  # 4 GiB the monitor must see
torch.cuda.synchronize()
print("LOAD_STARTED", torch.cuda.get_device_name(), flush=True)
end, n = time.time() + seconds, 0
while time.time() < end:
    for _ in range(20):
        c = a @ b
    torch.cuda.synchronize()
    n += 20
print(f"LOAD_DONE matmuls={n} tflops={n * 2 * 8192**3 / seconds / 1e12:.1f}", flush=True)
"""


def cuda_python(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else [sys.executable, shutil.which("python3"), "/usr/bin/python3"]
    for python in filter(None, candidates):
        probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, timeout=120)
        if probe.stdout.strip() == "True":
            return python
    return None


def busiest(snapshot: dict) -> float:
    return max((g["utilization_percent"] or 0.0 for g in snapshot["gpus"]), default=0.0)


def memory_growth(baseline: dict, snapshot: dict) -> float:
    before = {g["index"]: g["memory_used_bytes"] or 0 for g in baseline["gpus"]}
    return max(((g["memory_used_bytes"] or 0) - before.get(g["index"], 0) for g in snapshot["gpus"]), default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description="Check the monitor against a real CUDA load.")
    parser.add_argument("output", type=Path, help="where to write the snapshots and checks (JSON)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--load-python", default=None, help="a Python whose torch has CUDA")
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)

    monitor = MultiGPUPerformanceMonitor(interval=1.0, children_refresh_s=1.0)
    baseline = monitor.sample().model_dump(mode="json")
    checks: dict[str, dict] = {"nvml": {"ok": baseline["nvml"] == "available" and bool(baseline["gpus"]),
                                        "status": baseline["nvml"], "gpus": len(baseline["gpus"])}}
    python = cuda_python(args.load_python) if checks["nvml"]["ok"] else None
    checks["cuda_load"] = {"ok": python is not None, "python": python}
    load_output = ""
    during: list[dict] = []
    if python is not None:
        load = subprocess.Popen([python, "-c", LOAD, str(args.seconds)], stdout=subprocess.PIPE, text=True)
        started_line = load.stdout.readline().strip()
        monitor.start()
        deadline = time.monotonic() + args.seconds + 120
        while load.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        monitor.stop()
        if load.poll() is None:
            load.kill()
        load_output = started_line + " " + (load.stdout.read() or "").strip()
        load.wait()
        during = [s.model_dump(mode="json") for s in monitor.history[1:]]
        checks["cuda_load"].update(ok=load.returncode == 0 and "LOAD_DONE" in load_output, output=load_output)
    after = monitor.sample().model_dump(mode="json")

    peak_util = max((busiest(s) for s in during), default=0.0)
    growth = max((memory_growth(baseline, s) for s in during), default=0)
    child_seen = any(p["role"] == "child" for s in during for p in s["host"]["processes"])
    checks["utilization_rose"] = {"ok": peak_util >= 50 and peak_util >= busiest(baseline) + 30,
                                  "baseline_percent": busiest(baseline), "peak_percent": peak_util}
    checks["memory_grew"] = {"ok": growth >= 3 * GIB, "growth_gib": round(growth / GIB, 2),
                             "expected_gib": ">= 3"}
    checks["load_process_seen"] = {"ok": child_seen}
    families = {f.name: f.samples for f in text_string_to_metric_families(render_prometheus(monitor))}
    util_series = families.get("DCGM_FI_DEV_GPU_UTIL", [])
    checks["prometheus"] = {"ok": len(util_series) == len(after["gpus"]) > 0, "gpu_util_series": len(util_series)}
    cpu_percent = 100 * monitor.sampler_cpu_seconds / max(monitor.sampler_wall_seconds, 1e-9)
    checks["sampler_overhead"] = {"ok": bool(during) and cpu_percent < 1.0,
                                  "percent_of_one_core": round(cpu_percent, 4),
                                  "samples": len(during)}

    report = monitor.write_report(args.output.parent, png=True)
    summary = monitor.summary()
    monitor.close()
    passed = all(c["ok"] for c in checks.values())
    args.output.write_text(json.dumps({"passed": passed, "checks": checks, "baseline": baseline, "during": during,
                                       "after": after, "summary": summary,
                                       "report": [str(p) for p in report]}, indent=2) + "\n")
    for name, check in checks.items():
        figures = ", ".join(f"{k}={v}" for k, v in check.items() if k != "ok")
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {name}: {figures}")
    print(f"{'PASS' if passed else 'FAIL'}: GPU utilization {busiest(baseline):.0f}% -> {peak_util:.0f}%, "
          f"memory +{growth / GIB:.2f} GiB, sampler {cpu_percent:.3f}% of one core -> {args.output}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
