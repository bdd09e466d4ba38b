"""The distributions evalfleet and lm-eval need that the GPU machine lacks, pinned to the versions
installed here (the ones the test suite passed with): one `name==version` per line.

    python scripts/gpu/missing.py [present.txt]
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ("evalfleet", "lm-eval")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def present(path: Path) -> set[str]:
    lines = (line for line in path.read_text().splitlines() if not line.startswith("#"))
    return {normalize(name) for line in lines for name in line.split()}


def needed(on_machine: set[str], roots: tuple[str, ...] = ROOTS) -> dict[str, str]:
    """What the roots require (no extras) with its installed version, not looking inside what is on the machine."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = normalize(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker excluded it here (another platform or Python)
        found[name] = dist.version
        if name in on_machine:
            continue
        for requirement in dist.requires or []:
            spec, _, marker = requirement.partition(";")
            if "extra" in marker:
                continue
            todo.append(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0])
    return found


def missing(on_machine: set[str]) -> list[str]:
    wanted = needed(on_machine)
    return sorted(f"{name}=={version}" for name, version in wanted.items() if name not in on_machine and name != "evalfleet")


if __name__ == "__main__":
    listing = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("present.txt")
    print("\n".join(missing(present(listing))))
