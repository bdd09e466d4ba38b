"""A stand-in for the `pynvml` module: the same function names, constants and error classes
(taken from the real pynvml), with the values an H100 SXM node reports. Tests change a
`FakeGpu`'s fields between samples to script what NVML "sees".
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

H100_MEMORY = 85_520_809_984  # 81559 MiB, as nvidia-smi reports an H100 80GB HBM3


@dataclass
class FakeGpu:
    index: int
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    utilization: int = 0
    memory_utilization: int = 0
    memory_used: int = 529_006_592
    memory_total: int = H100_MEMORY
    temperature: int = 33
    power_mw: int = 71_234
    power_limit_mw: int = 700_000
    sm_clock: int = 345
    sm_clock_max: int = 1980
    throttle: int = pynvml.nvmlClocksThrottleReasonGpuIdle
    pcie_tx_kb: int = 2_150
    pcie_rx_kb: int = 4_025
    nvlinks: int = 18
    nvlink_tx_kib: int = 0
    nvlink_rx_kib: int = 0
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    not_supported: set[str] = field(default_factory=set)
    failing: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.uuid = self.uuid or f"GPU-5c3d7f2a-91b4-4e6f-8a0d-{self.index:012x}"


class FakeNvml:
    """Module-shaped: `collector = NvmlCollector(nvml=FakeNvml([...]))`."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported

    def __init__(self, gpus: list[FakeGpu] | None = None, init_error: int | None = None, driver: str = "550.54.15"):
        self.gpus = gpus if gpus is not None else [FakeGpu(0), FakeGpu(1)]
        self.init_error = init_error
        self.driver = driver
        self.calls: Counter[str] = Counter()
        self.events: deque[SimpleNamespace] = deque()
        self.initialised = False
        self.event_sets_freed = 0
        for name in dir(pynvml):
            if name.startswith(("NVML_", "nvmlEventType", "nvmlClocks")):
                setattr(self, name, getattr(pynvml, name))

    # --- scripting helpers used by tests ---------------------------------------------------
    def inject_xid(self, index: int, xid: int) -> None:
        self.events.append(SimpleNamespace(
            device=self.gpus[index], eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid,
            gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF,
        ))

    def _device_call(self, function: str, handle: FakeGpu) -> None:
        self.calls[function] += 1
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if function in handle.not_supported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if function in handle.failing:
            raise pynvml.NVMLError(handle.failing[function])

    # --- the pynvml surface the collector uses ----------------------------------------------
    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.calls["nvmlShutdown"] += 1
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetIndex(self, handle: FakeGpu) -> int:
        return handle.index

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        self._device_call("nvmlDeviceGetName", handle)
        return handle.name

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._device_call("nvmlDeviceGetUUID", handle)
        return handle.uuid

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        self._device_call("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=handle.utilization, memory=handle.memory_utilization)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        self._device_call("nvmlDeviceGetMemoryInfo", handle)
        return SimpleNamespace(total=handle.memory_total, used=handle.memory_used,
                               free=handle.memory_total - handle.memory_used)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        self._device_call("nvmlDeviceGetTemperature", handle)
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return handle.temperature

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._device_call("nvmlDeviceGetPowerUsage", handle)
        return handle.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeGpu) -> int:
        self._device_call("nvmlDeviceGetEnforcedPowerLimit", handle)
        return handle.power_limit_mw

    def nvmlDeviceGetClockInfo(self, handle: FakeGpu, clock: int) -> int:
        self._device_call("nvmlDeviceGetClockInfo", handle)
        assert clock == pynvml.NVML_CLOCK_SM
        return handle.sm_clock

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeGpu, clock: int) -> int:
        self._device_call("nvmlDeviceGetMaxClockInfo", handle)
        return handle.sm_clock_max

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeGpu) -> int:
        self._device_call("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        return handle.throttle

    def nvmlDeviceGetPcieThroughput(self, handle: FakeGpu, counter: int) -> int:
        self._device_call("nvmlDeviceGetPcieThroughput", handle)
        return handle.pcie_tx_kb if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else handle.pcie_rx_kb

    def nvmlDeviceGetNvLinkState(self, handle: FakeGpu, link: int) -> int:
        self._device_call("nvmlDeviceGetNvLinkState", handle)
        if link >= 18:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED if link < handle.nvlinks else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetFieldValues(self, handle: FakeGpu, fields: list) -> list[SimpleNamespace]:
        self._device_call("nvmlDeviceGetFieldValues", handle)
        counters = {pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: handle.nvlink_tx_kib,
                    pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: handle.nvlink_rx_kib}
        out = []
        for field_id, scope in fields:
            known = field_id in counters
            out.append(SimpleNamespace(
                fieldId=field_id, scopeId=scope, timestamp=0, latencyUsec=0,
                valueType=pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
                nvmlReturn=pynvml.NVML_SUCCESS if known else pynvml.NVML_ERROR_NOT_SUPPORTED,
                value=SimpleNamespace(ullVal=counters.get(field_id, 0)),
            ))
        return out

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeGpu, error_type: int, counter_type: int) -> int:
        self._device_call("nvmlDeviceGetTotalEccErrors", handle)
        assert counter_type == pynvml.NVML_VOLATILE_ECC
        return handle.ecc_corrected if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else handle.ecc_uncorrected

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle: FakeGpu, event_types: int, event_set: str) -> None:
        self._device_call("nvmlDeviceRegisterEvents", handle)

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        self.calls["nvmlEventSetWait_v2"] += 1
        if not self.events:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        return self.events.popleft()

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.event_sets_freed += 1
