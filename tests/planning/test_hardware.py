"""Inventories: specs, cluster files, and detection (NVML and torch are faked at the module boundary)."""

from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest

from evalfleet.planning import GPU_SPECS, Inventory, PlanningError, hardware
from evalfleet.planning.hardware import find_spec, parse_gpus


def test_cpu_spec_uses_ram():
    inventory = Inventory.from_spec("cpu")
    assert inventory.is_cpu_only and inventory.num_gpus == 0
    device = inventory.nodes[0].gpus[0]
    assert device.is_cpu and 0 < device.free_gb <= device.total_gb
    assert inventory.describe() == "cpu"


@pytest.mark.parametrize(("spec", "asked", "loaded"), [
    ("8xA100-80GB", "auto", "bfloat16"),
    ("4xV100-32GB", "auto", "float16"),  # compute capability 7.0 runs no bfloat16
    ("4xT4-16GB", "float32", "float32"),
    ("cpu", "auto", "float32"),
])
def test_a_pool_answers_auto_as_its_ranks_will(spec, asked, loaded):
    """Before launch, `auto` comes from the pool's devices, as each rank decides it on its own."""
    assert Inventory.from_spec(spec).load_dtype(asked) == loaded


@pytest.mark.parametrize(
    ("spec", "nodes", "per_node", "name", "total", "interconnect", "intra"),
    [
        ("8xA100-80GB", 1, 8, "A100-80GB", 80, "nvlink", 600),
        ("2x8xH100-80GB", 2, 8, "H100-80GB", 80, "nvlink", 900),
        ("4xA10G-24GB", 1, 4, "A10G-24GB", 24, "pcie", 25),
        ("8xA100-40GB", 1, 8, "A100-40GB", 40, "nvlink", 600),
        ("a100", 1, 1, "A100-80GB", 80, "nvlink", 600),
        ("4 x L40S", 1, 4, "L40S", 48, "pcie", 25),
        ("8xH200", 1, 8, "H200", 141, "nvlink", 900),
    ],
)
def test_specs(spec, nodes, per_node, name, total, interconnect, intra):
    inventory = Inventory.from_spec(spec)
    assert len(inventory.nodes) == nodes
    assert inventory.num_gpus == nodes * per_node and not inventory.is_cpu_only
    for node in inventory.nodes:
        assert len(node.gpus) == per_node
        assert node.interconnect == interconnect and node.intra_bandwidth_gbps == intra
        assert all(gpu.name == name and gpu.total_gb == gpu.free_gb == total for gpu in node.gpus)


def test_mixed_spec_and_datasheet_values():
    inventory = Inventory.from_spec("8xA100-80GB + 4xA10G-24GB")
    assert [len(node.gpus) for node in inventory.nodes] == [8, 4]
    assert inventory.describe() == "8xA100-80GB + 4xA10G-24GB"
    a100 = inventory.nodes[0].gpus[0]
    assert a100.compute_capability == (8, 0)
    assert a100.spec.bf16_tflops == 312 and a100.spec.memory_bandwidth_gbps == 2039
    for name in ("A10G", "L4", "L40S", "A100-40GB", "A100-80GB", "H100", "H200", "B200"):
        assert GPU_SPECS[name].bf16_tflops > 0 and GPU_SPECS[name].memory_bandwidth_gbps > 0


@pytest.mark.parametrize("spec", ["8xFOO", "", "0xA100-80GB", "8xA100-80GB-SXM", "x8", "8xA10-24GB", "2x0xH100"])
def test_malformed_specs_fail_in_one_sentence(spec):
    with pytest.raises(PlanningError) as info:
        Inventory.from_spec(spec)
    message = str(info.value)
    assert "\n" not in message and message
    if spec == "8xFOO":
        assert message.startswith("unknown GPU 'FOO'") and "A100-80GB" in message


@pytest.mark.parametrize(
    ("name", "memory", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", 79.3, "A100-80GB"),
        ("NVIDIA A100-PCIE-40GB", 39.4, "A100-40GB"),
        ("NVIDIA H100 80GB HBM3", 79.6, "H100"),
        ("NVIDIA L40S", 44.5, "L40S"),
        ("NVIDIA L4", 22.5, "L4"),
        ("Tesla T4", 15.0, "T4"),
        ("NVIDIA GeForce RTX 4090", 24.0, None),
    ],
)
def test_nvml_names_map_to_datasheets(name, memory, expected):
    spec = find_spec(name, memory)
    assert (spec.name if spec else None) == expected


CLUSTER = """
inter_bandwidth_gbps: 50
nodes:
  - gpus: 8xH100-80GB
    count: 2
    name: dgx
  - gpus: [{name: A100-80GB, free_gb: 30}, A100-80GB]
    interconnect: pcie
  - gpus: 4xL4
    free_gb: [20, 24, 1, 24]
    intra_bandwidth_gbps: 16
    inter_bandwidth_gbps: 12.5
"""


def test_cluster_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    inventory = Inventory.from_yaml(path)
    assert [len(node.gpus) for node in inventory.nodes] == [8, 8, 2, 4]
    assert [node.name for node in inventory.nodes[:2]] == ["dgx0", "dgx1"]
    assert inventory.nodes[0].inter_bandwidth_gbps == 50 and inventory.nodes[0].interconnect == "nvlink"
    pcie = inventory.nodes[2]
    assert pcie.interconnect == "pcie" and pcie.intra_bandwidth_gbps == 25
    assert [gpu.free_gb for gpu in pcie.gpus] == [30, 80]
    l4 = inventory.nodes[3]
    assert [gpu.free_gb for gpu in l4.gpus] == [20, 24, 1, 24]
    assert (l4.intra_bandwidth_gbps, l4.inter_bandwidth_gbps) == (16, 12.5)
    assert parse_gpus(str(path)).num_gpus == 22


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: []", "non-empty 'nodes'"),
        ("nodes: [{count: 2}]", "needs a 'gpus' entry"),
        ("nodes: [{gpus: 2x8xA100}]", "use 'count'"),
        ("nodes: [{gpus: []}]", "empty or unreadable"),
        ("nodes: [{gpus: 2xA100, free_gb: [1]}]", "2 GPUs"),
        ("nodes: [{gpus: 2xA100, free_gb: [1, 99]}]", "outside 0..80"),
        ("nodes: [{gpus: 2xA100, interconnect: infiniband}]", "must be 'nvlink' or 'pcie'"),
        ("nodes: [{gpus: [{free_gb: 3}]}]", "needs a 'name'"),
        ("nodes: [{gpus: ['2xA100']}]", "cannot read GPU name"),
        ("nodes: [{gpus: [Z80]}]", "unknown GPU 'Z80'"),
        ("nodes: [unbalanced", "cannot read the cluster file"),
    ],
)
def test_bad_cluster_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PlanningError, match=message):
        Inventory.from_yaml(path)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(PlanningError, match="cannot read the cluster file"):
        Inventory.from_yaml(tmp_path / "absent.yaml")


class _NVMLError(Exception):
    pass


def _fake_pynvml(gpus, nvlink=True, fail_init=False):
    """The few pynvml calls detection makes, answering for `gpus` = [(name, total, free, cc)]."""
    module = types.ModuleType("pynvml")
    module.NVMLError = _NVMLError
    module.NVML_FEATURE_ENABLED = 1
    module.NVML_NVLINK_MAX_LINKS = 4
    calls = []

    def init():
        if fail_init:
            raise _NVMLError("driver not loaded")
        calls.append("init")

    def link_state(handle, link):
        if not nvlink:
            raise _NVMLError("not supported")
        return 1 if link == 2 else 0

    module.nvmlInit = init
    module.nvmlShutdown = lambda: calls.append("shutdown")
    module.nvmlDeviceGetCount = lambda: len(gpus)
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetName = lambda handle: gpus[handle][0].encode()
    module.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(total=gpus[handle][1], free=gpus[handle][2])
    module.nvmlDeviceGetCudaComputeCapability = lambda handle: gpus[handle][3]
    module.nvmlDeviceGetNvLinkState = link_state
    module.calls = calls
    return module


GIB = 2**30


def test_detect_with_nvml_and_nvlink(monkeypatch):
    fake = _fake_pynvml([("NVIDIA H100 80GB HBM3", 80 * GIB, 70 * GIB, (9, 0))] * 2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inventory = Inventory.detect()
    node = inventory.nodes[0]
    assert inventory.num_gpus == 2 and node.interconnect == "nvlink" and node.intra_bandwidth_gbps == 900
    assert [(g.total_gb, g.free_gb, g.compute_capability) for g in node.gpus] == [(80, 70, (9, 0))] * 2
    assert node.gpus[0].spec.name == "H100"
    assert fake.calls == ["init", "shutdown"]


def test_detect_with_nvml_over_pcie_and_unknown_gpu(monkeypatch):
    fake = _fake_pynvml([("NVIDIA GeForce RTX 4090", 24 * GIB, 23 * GIB, (8, 9))], nvlink=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    node = Inventory.detect().nodes[0]
    assert node.interconnect == "pcie" and node.gpus[0].spec.name == "unknown"


def test_detect_falls_back_to_cpu_without_a_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([], fail_init=True))
    monkeypatch.setattr(hardware, "_detect_torch", lambda: None)
    assert Inventory.detect().is_cpu_only


def test_detect_with_torch_when_nvml_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    props = SimpleNamespace(name="NVIDIA L4", major=8, minor=9)
    cuda = SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 2,
        get_device_properties=lambda index: props,
        mem_get_info=lambda index: (20 * GIB, 22.5 * GIB),
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    inventory = Inventory.detect()
    assert inventory.num_gpus == 2
    assert inventory.nodes[0].gpus[0].spec.name == "L4" and inventory.nodes[0].gpus[0].free_gb == 20


def test_detect_without_cuda_in_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False)))
    assert Inventory.detect().is_cpu_only


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="this machine has an NVIDIA driver")
def test_detect_here_is_cpu_only_and_parse_gpus_auto():
    assert parse_gpus("auto").is_cpu_only
    assert Inventory.cpu(total_gb=64, free_gb=60).nodes[0].gpus[0].free_gb == 60
