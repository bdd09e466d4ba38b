"""The devices a plan may use: nodes of GPUs, how they are linked, and how fast they are.

An `Inventory` comes from the local machine (NVML, else torch.cuda, else the CPU and its RAM),
from a spec such as `8xA100-80GB`, `2x8xH100-80GB` or `8xA100-80GB+4xA10G-24GB`, or from a
YAML cluster file. Memory is in GiB, printed as "GB" as nvidia-smi does; bandwidths are in
GB/s (gigabytes per second) despite the `_gbps` spelling the API shares with its callers.

Cluster file:

    inter_bandwidth_gbps: 50          # optional default for every node
    nodes:
      - gpus: 8xH100-80GB             # one node's GPUs, as a spec without a node count
        count: 2                      # optional: that many identical nodes
        interconnect: nvlink          # optional: nvlink or pcie
        intra_bandwidth_gbps: 900     # optional
        free_gb: [80, 80, 12, 80, 80, 80, 80, 80]   # optional, per GPU
      - gpus: [{name: A100-80GB, free_gb: 30}, {name: A100-80GB}]
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalfleet.planning.model_profile import GIB, PlanningError


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet figures: dense bf16 TFLOP/s, memory bandwidth and NVLink bandwidth per GPU (GB/s)."""

    name: str
    memory_gb: float
    bf16_tflops: float
    memory_bandwidth_gbps: float
    nvlink_gbps: float = 0.0
    compute_capability: tuple[int, int] | None = None


GPU_SPECS: dict[str, GPUSpec] = {
    spec.name: spec
    for spec in (
        GPUSpec("A10G", 24, 70, 600, 0, (8, 6)),
        GPUSpec("L4", 24, 121, 300, 0, (8, 9)),
        GPUSpec("L40S", 48, 362, 864, 0, (8, 9)),
        GPUSpec("A100-40GB", 40, 312, 1555, 600, (8, 0)),
        GPUSpec("A100-80GB", 80, 312, 2039, 600, (8, 0)),
        GPUSpec("H100", 80, 989, 3350, 900, (9, 0)),
        GPUSpec("H200", 141, 989, 4800, 900, (9, 0)),
        GPUSpec("B200", 180, 2250, 8000, 1800, (10, 0)),
        GPUSpec("V100", 32, 125, 900, 300, (7, 0)),
        GPUSpec("T4", 16, 65, 320, 0, (7, 5)),
    )
}
# float32 matmul peak of one core: 196 GFLOP/s on this project's 2-core machine, measured by
# benchmarks/vs_lmeval.py (`matmul_peak_gflops`); runs replace it by measured speeds anyway.
CPU_TFLOPS_PER_CORE = 0.098
CPU_SPEC = GPUSpec("cpu", 0, CPU_TFLOPS_PER_CORE, 50)
UNKNOWN_GPU = GPUSpec("unknown", 0, 100, 1000)
PCIE_GBPS = 25.0
UNKNOWN_NVLINK_GBPS = 300.0
DEFAULT_INTER_NODE_GBPS = 25.0


def find_spec(name: str, memory_gb: float | None = None) -> GPUSpec | None:
    """The datasheet entry for a GPU name as specs or NVML spell it ("NVIDIA A100-SXM4-80GB")."""
    tokens = [t for t in re.split(r"[^A-Za-z0-9]+", name.upper()) if t]
    for token in tokens:
        variants = [s for key, s in GPU_SPECS.items() if key.split("-")[0].upper() == token]
        if variants:
            if memory_gb is None:
                return max(variants, key=lambda s: s.memory_gb)
            return min(variants, key=lambda s: abs(s.memory_gb - memory_gb))
    return None


@dataclass(frozen=True)
class GPU:
    """One device. `free_gb` is what a new job may use; the CPU appears as one device named "cpu"."""

    name: str
    total_gb: float
    free_gb: float
    compute_capability: tuple[int, int] | None = None
    spec: GPUSpec = field(default=UNKNOWN_GPU, compare=False, repr=False)

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"


@dataclass
class Node:
    gpus: list[GPU]
    interconnect: str = "pcie"
    intra_bandwidth_gbps: float = PCIE_GBPS
    inter_bandwidth_gbps: float = DEFAULT_INTER_NODE_GBPS
    name: str = ""


@dataclass
class Inventory:
    nodes: list[Node]

    @property
    def num_gpus(self) -> int:
        return sum(1 for node in self.nodes for gpu in node.gpus if not gpu.is_cpu)

    @property
    def device_count(self) -> int:
        """Every device, GPUs and CPU slots alike."""
        return sum(len(node.gpus) for node in self.nodes)

    @property
    def is_cpu_only(self) -> bool:
        return all(gpu.is_cpu for node in self.nodes for gpu in node.gpus)

    def load_dtype(self, dtype: str) -> str:
        """The dtype ranks on this pool load for `dtype`, as each decides it on its own device
        (`runtime.group.GroupSpec.on_this_device`): `auto` is float32 on CPUs, and on GPUs bfloat16
        where every GPU runs it (compute capability 8.0 or newer, or not known), else float16."""
        if dtype != "auto":
            return dtype
        if self.is_cpu_only:
            return "float32"
        capabilities = [gpu.compute_capability for node in self.nodes for gpu in node.gpus if not gpu.is_cpu]
        return "bfloat16" if all(c is None or c >= (8, 0) for c in capabilities) else "float16"

    def describe(self) -> str:
        parts = []
        for node in self.nodes:
            names = sorted({gpu.name for gpu in node.gpus})
            parts.append(f"{len(node.gpus)}x{'/'.join(names)}" if names != ["cpu"] else "cpu")
        return " + ".join(parts)

    @classmethod
    def cpu(cls, total_gb: float | None = None, free_gb: float | None = None) -> Inventory:
        """The CPU as the only device, with its RAM as device memory."""
        if total_gb is None or free_gb is None:
            import psutil

            memory = psutil.virtual_memory()
            total_gb = memory.total / GIB if total_gb is None else total_gb
            free_gb = memory.available / GIB if free_gb is None else free_gb
        spec = GPUSpec("cpu", total_gb, CPU_TFLOPS_PER_CORE * (os.cpu_count() or 1), CPU_SPEC.memory_bandwidth_gbps)
        device = GPU("cpu", round(total_gb, 2), round(free_gb, 2), None, spec)
        return cls([Node([device], interconnect="cpu", intra_bandwidth_gbps=0.0, name="localhost")])

    @classmethod
    def from_spec(cls, spec: str) -> Inventory:
        """Parse `cpu`, `8xA100-80GB`, `2x8xH100-80GB`, `4xA10G-24GB`, or several joined by '+'."""
        text = spec.strip()
        if not text:
            raise PlanningError("the GPU spec is empty; use e.g. 'cpu', '8xA100-80GB' or '2x8xH100-80GB'")
        if text.lower() == "cpu":
            return cls.cpu()
        nodes: list[Node] = []
        for part in re.split(r"\s*[+,]\s*", text):
            count, gpus = _parse_node_spec(part, spec)
            nodes.extend(_node_of(gpus) for _ in range(count))
        return cls(nodes)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Inventory:
        import yaml

        try:
            document = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise PlanningError(f"cannot read the cluster file '{path}': {str(error).splitlines()[0]}") from None
        if not isinstance(document, dict) or not isinstance(document.get("nodes"), list) or not document["nodes"]:
            raise PlanningError(f"the cluster file '{path}' needs a non-empty 'nodes' list")
        default_inter = float(document.get("inter_bandwidth_gbps", DEFAULT_INTER_NODE_GBPS))
        nodes: list[Node] = []
        for entry in document["nodes"]:
            nodes.extend(_node_from_yaml(entry, default_inter, str(path)))
        return cls(nodes)

    @classmethod
    def detect(cls) -> Inventory:
        """This machine: NVML, else torch.cuda, else the CPU with its RAM."""
        return _detect_nvml() or _detect_torch() or cls.cpu()


def parse_gpus(text: str) -> Inventory:
    """`--gpus` as the CLI takes it: a spec, a YAML cluster file, or "auto" for this machine."""
    if text.strip().lower() in ("", "auto", "local"):
        return Inventory.detect()
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return Inventory.from_yaml(text)
    return Inventory.from_spec(text)


_NODE_SPEC = re.compile(r"^(?:(\d+)\s*x\s*)?(?:(\d+)\s*x\s*)?([A-Za-z][A-Za-z0-9]*)(?:-(\d+(?:\.\d+)?)\s*GI?B)?$", re.I)


def _parse_node_spec(part: str, whole: str) -> tuple[int, list[GPU]]:
    match = _NODE_SPEC.match(part)
    if match is None:
        raise PlanningError(f"cannot read GPU spec '{whole}'; write e.g. '8xA100-80GB' or '2x8xH100-80GB'")
    first, second, name, memory = match.groups()
    nodes, per_node = (int(first), int(second)) if second else (1, int(first or 1))
    if nodes < 1 or per_node < 1:
        raise PlanningError(f"GPU spec '{whole}' asks for zero nodes or GPUs")
    gpu = _gpu_named(name, float(memory) if memory else None, whole)
    return nodes, [gpu] * per_node


def _gpu_named(name: str, memory_gb: float | None, whole: str) -> GPU:
    spec = find_spec(name, memory_gb)
    if spec is None or spec.name.split("-")[0].upper() != name.upper():
        known = ", ".join(GPU_SPECS)
        raise PlanningError(f"unknown GPU '{name}' in spec '{whole}'; known GPUs: {known}")
    total = memory_gb if memory_gb is not None else spec.memory_gb
    label = spec.name if memory_gb is None or spec.name.endswith("GB") else f"{spec.name}-{total:g}GB"
    return GPU(label, total, total, spec.compute_capability, spec)


def _node_of(gpus: list[GPU], **overrides: Any) -> Node:
    nvlink = min(gpu.spec.nvlink_gbps for gpu in gpus)
    node = Node(list(gpus), "nvlink" if nvlink > 0 else "pcie", nvlink or PCIE_GBPS)
    for key, value in overrides.items():
        if value is not None:
            setattr(node, key, value)
    return node


def _node_from_yaml(entry: Any, default_inter: float, path: str) -> list[Node]:
    if not isinstance(entry, dict) or "gpus" not in entry:
        raise PlanningError(f"each node in '{path}' needs a 'gpus' entry (a spec like '8xA100-80GB' or a list)")
    raw = entry["gpus"]
    if isinstance(raw, str):
        count, gpus = _parse_node_spec(raw.strip(), raw)
        if count != 1:
            raise PlanningError(f"node spec '{raw}' in '{path}' names several nodes; use 'count' instead")
    elif isinstance(raw, list) and raw:
        gpus = [_gpu_from_yaml(item, path) for item in raw]
    else:
        raise PlanningError(f"a node in '{path}' has an empty or unreadable 'gpus' entry")
    free = entry.get("free_gb")
    if isinstance(free, list):
        if len(free) != len(gpus):
            raise PlanningError(f"a node in '{path}' lists {len(free)} free_gb values for {len(gpus)} GPUs")
        gpus = [_with_free(gpu, value, path) for gpu, value in zip(gpus, free, strict=True)]
    interconnect = entry.get("interconnect")
    if interconnect is not None and interconnect not in ("nvlink", "pcie"):
        raise PlanningError(f"interconnect '{interconnect}' in '{path}' must be 'nvlink' or 'pcie'")
    nodes = []
    for index in range(int(entry.get("count", 1))):
        node = _node_of(
            gpus,
            interconnect=interconnect,
            intra_bandwidth_gbps=_maybe_float(entry.get("intra_bandwidth_gbps")),
            inter_bandwidth_gbps=float(entry.get("inter_bandwidth_gbps", default_inter)),
            name=f"{entry.get('name', 'node')}{index if entry.get('count', 1) > 1 else ''}",
        )
        if interconnect == "pcie" and entry.get("intra_bandwidth_gbps") is None:
            node.intra_bandwidth_gbps = PCIE_GBPS
        nodes.append(node)
    return nodes


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _gpu_from_yaml(item: Any, path: str) -> GPU:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise PlanningError(f"each GPU in '{path}' needs a 'name', e.g. {{name: A100-80GB, free_gb: 40}}")
    match = _NODE_SPEC.match(str(item["name"]))
    if match is None or match.group(1):
        raise PlanningError(f"cannot read GPU name '{item['name']}' in '{path}'")
    gpu = _gpu_named(match.group(3), _maybe_float(item.get("total_gb", match.group(4))), str(item["name"]))
    return _with_free(gpu, item.get("free_gb"), path)


def _with_free(gpu: GPU, free: Any, path: str) -> GPU:
    if free is None:
        return gpu
    value = float(free)
    if not 0 <= value <= gpu.total_gb:
        raise PlanningError(f"free_gb {value:g} in '{path}' is outside 0..{gpu.total_gb:g} for {gpu.name}")
    return GPU(gpu.name, gpu.total_gb, value, gpu.compute_capability, gpu.spec)


def _detected(name: str, total_bytes: int, free_bytes: int, capability: tuple[int, int] | None) -> GPU:
    total = total_bytes / GIB
    spec = find_spec(name, total) or UNKNOWN_GPU
    return GPU(name, round(total, 2), round(free_bytes / GIB, 2), capability, spec)


def _detect_nvml() -> Inventory | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        gpus, nvlink = [], False
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            gpus.append(_detected(name, memory.total, memory.free, capability))
            nvlink = nvlink or _has_nvlink(pynvml, handle)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
    if not gpus:
        return None
    if nvlink:
        bandwidth = min(gpu.spec.nvlink_gbps for gpu in gpus) or UNKNOWN_NVLINK_GBPS
        return Inventory([Node(gpus, "nvlink", bandwidth, name="localhost")])
    return Inventory([Node(gpus, "pcie", PCIE_GBPS, name="localhost")])


def _has_nvlink(pynvml: Any, handle: Any) -> bool:
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED:
                return True
        except pynvml.NVMLError:
            return False
    return False


def _detect_torch() -> Inventory | None:
    """torch.cuda, tried only where a CUDA device node exists: importing torch costs seconds."""
    if "torch" not in sys.modules and not os.path.exists("/dev/nvidiactl"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(_detected(props.name, total, free, (props.major, props.minor)))
    return Inventory([Node(gpus, "pcie", PCIE_GBPS, name="localhost")])
