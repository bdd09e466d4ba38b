"""Where `evalfleet run`'s seconds before the first request go.

Runs `evalfleet run --model demo --tasks demo_arith --limit 20 --no-cache` in a fresh interpreter
(best of `--rounds`), and reads its results.json: start-up (process start to the model loaded and
the tasks built), the rest of the split, and the wall time. Then once more under
`python -X importtime`, whose per-module self times are summed by top-level package, so that the
imports' share of start-up is split between evalfleet's own modules and each library's
(importtime's own overhead inflates the total a little; the shares are what count). Writes
benchmarks/results/startup.json.

    python benchmarks/startup.py [--rounds 3] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RUN = ["run", "--model", "demo", "--tasks", "demo_arith", "--limit", "20", "--no-cache"]


def one_run(extra: list[str]) -> tuple[float, dict, str]:
    out = Path(tempfile.mkdtemp(prefix="evalfleet-startup-"))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *extra, "-m", "evalfleet.cli", *RUN, "--output", str(out)],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    split = json.loads((out / "results.json").read_text())["evalfleet"]["timing"]["split"]
    return wall, split, done.stderr


def imports_by_package(importtime: str) -> Counter:
    """Self import time (seconds) per top-level package, from `-X importtime`'s stderr."""
    totals: Counter = Counter()
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = (part.strip() for part in line.removeprefix("import time:").split("|"))
        totals[name.split(".")[0]] += int(self_us) / 1e6
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "results" / "startup.json"))
    args = parser.parse_args()
    runs = [one_run([]) for _ in range(args.rounds)]
    wall, split, _ = min(runs, key=lambda r: r[1]["startup_seconds"])
    _, traced_split, stderr = one_run(["-X", "importtime"])
    packages = imports_by_package(stderr)
    total = sum(packages.values())
    top = dict(sorted(((name, round(seconds, 3)) for name, seconds in packages.items() if seconds >= 0.05),
                      key=lambda kv: -kv[1]))
    report = {
        "command": "evalfleet " + " ".join(RUN),
        "rounds": args.rounds,
        "wall_seconds": round(wall, 3),
        "split": split,
        "startup_seconds_all_rounds": [r[1]["startup_seconds"] for r in runs],
        "importtime": {
            "startup_seconds_traced": traced_split["startup_seconds"],
            "imports_seconds": round(total, 3),
            "evalfleet_seconds": round(packages.get("evalfleet", 0.0), 3),
            "evalfleet_share": round(packages.get("evalfleet", 0.0) / total, 4) if total else None,
            "by_package": top,
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
