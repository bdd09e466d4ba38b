"""GPU readings through NVML (the `pynvml` module of nvidia-ml-py).

The module is injectable (`NvmlCollector(nvml=fake)`) so tests replace NVML at exactly this
boundary. A field a GPU does not support is remembered and not asked again, which keeps a
1 Hz sampler cheap on GPUs (or drivers) that lack, say, NVLink or ECC.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from evalfleet.monitoring.snapshot import GPUMetrics

# nvmlClocksEventReason* bits (nvml.h); DCGM_FI_DEV_CLOCK_THROTTLE_REASONS mirrors them bit for bit.
THROTTLE_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clock",
}
THERMAL_REASONS = frozenset({"sw_thermal", "hw_thermal", "hw_slowdown"})
POWER_REASONS = frozenset({"sw_power_cap", "hw_power_brake"})

_ALL_LINKS = 0xFFFFFFFF  # NVML scopeId meaning "summed over every NVLink"
_MAX_XID_EVENTS_PER_SAMPLE = 256


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Device:
    index: int
    handle: Any
    name: str | None = None
    uuid: str | None = None
    sm_clock_max_mhz: int | None = None
    nvlink_active_links: int | None = None
    unsupported: set[str] = field(default_factory=set)
    xid_supported: bool = False
    xid_errors: int = 0
    last_xid: int | None = None
    nvlink_counters: tuple[float, int, int] | None = None  # (monotonic time, tx KiB, rx KiB)


class NvmlCollector:
    """Reads the GPUs NVML can see (all, or those `restrict` keeps). `status` says 'available' or
    'unavailable: <reason>'."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self.status = "unavailable: not initialised"
        self.driver_version: str | None = None
        self._devices: list[_Device] = []
        self._only: set[int] | None = None
        self._events: Any = None
        self._nvml: Any = None
        try:
            module = nvml if nvml is not None else importlib.import_module("pynvml")
        except ImportError as error:
            self.status = f"unavailable: {error}"
            return
        try:
            module.nvmlInit()
        except module.NVMLError as error:
            self.status = f"unavailable: {error}"
            return
        self._nvml = module
        self.status = "available"
        try:
            self.driver_version = _text(module.nvmlSystemGetDriverVersion())
            for index in range(module.nvmlDeviceGetCount()):
                self._devices.append(self._open(index))
        except module.NVMLError as error:
            self.close()
            self.status = f"unavailable: {error}"
            return
        self._register_xid_events()

    @property
    def available(self) -> bool:
        return self._nvml is not None

    @property
    def device_count(self) -> int:
        return len(self._devices)

    def _open(self, index: int) -> _Device:
        nvml = self._nvml
        device = _Device(index=index, handle=nvml.nvmlDeviceGetHandleByIndex(index))
        errors: dict[str, str] = {}
        name = self._read(device, errors, "name", nvml.nvmlDeviceGetName)
        uuid = self._read(device, errors, "uuid", nvml.nvmlDeviceGetUUID)
        device.name = _text(name) if name is not None else None
        device.uuid = _text(uuid) if uuid is not None else None
        device.sm_clock_max_mhz = self._read(
            device, errors, "sm_clock_max", nvml.nvmlDeviceGetMaxClockInfo, nvml.NVML_CLOCK_SM
        )
        device.nvlink_active_links = self._count_nvlinks(device)
        return device

    def _count_nvlinks(self, device: _Device) -> int | None:
        active = 0
        for link in range(self._nvml.NVML_NVLINK_MAX_LINKS):
            try:
                state = self._nvml.nvmlDeviceGetNvLinkState(device.handle, link)
            except self._nvml.NVMLError:
                if link == 0:
                    return None
                break
            active += int(state == self._nvml.NVML_FEATURE_ENABLED)
        return active

    def _register_xid_events(self) -> None:
        nvml = self._nvml
        try:
            self._events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError:
            return
        for device in self._devices:
            try:
                nvml.nvmlDeviceRegisterEvents(device.handle, nvml.nvmlEventTypeXidCriticalError, self._events)
                device.xid_supported = True
            except nvml.NVMLError:
                device.xid_supported = False

    def _read(self, device: _Device, errors: dict[str, str], key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML call; NotSupported is remembered for this GPU, other errors are reported."""
        if key in device.unsupported:
            return None
        nvml = self._nvml
        try:
            return fn(device.handle, *args)
        except nvml.NVMLError as error:
            if error.value in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                device.unsupported.add(key)
            else:
                errors[key] = str(error)
            return None

    def _drain_xid_events(self) -> None:
        nvml = self._nvml
        if self._events is None:
            return
        by_index = {d.index: d for d in self._devices}
        for _ in range(_MAX_XID_EVENTS_PER_SAMPLE):
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError:  # NVML_ERROR_TIMEOUT: nothing pending
                return
            if not event.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                device = by_index.get(nvml.nvmlDeviceGetIndex(event.device))
            except nvml.NVMLError:
                device = None
            if device is not None:
                device.xid_errors += 1
                device.last_xid = int(event.eventData)

    def restrict(self, devices: Sequence[int | str] | None) -> None:
        """Watch only these GPUs: NVML indices or UUIDs (as `CUDA_VISIBLE_DEVICES` names them); None: all."""
        if devices is None:
            self._only = None
            return
        wanted = {str(device) for device in devices}
        self._only = {d.index for d in self._devices if str(d.index) in wanted or (d.uuid and d.uuid in wanted)}

    def collect(self) -> list[GPUMetrics]:
        if not self.available:
            return []
        self._drain_xid_events()
        return [self._collect_one(device) for device in self._devices if self._only is None or device.index in self._only]

    def _collect_one(self, device: _Device) -> GPUMetrics:
        nvml = self._nvml
        errors: dict[str, str] = {}

        def read(key: str, fn: Callable[..., Any], *args: Any) -> Any:
            return self._read(device, errors, key, fn, *args)

        util = read("utilization", nvml.nvmlDeviceGetUtilizationRates)
        memory = read("memory", nvml.nvmlDeviceGetMemoryInfo)
        temperature = read("temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        power_mw = read("power", nvml.nvmlDeviceGetPowerUsage)
        limit_mw = read("power_limit", nvml.nvmlDeviceGetEnforcedPowerLimit)
        sm_clock = read("sm_clock", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
        throttle = read("throttle_reasons", nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        pcie_tx = read("pcie_tx", nvml.nvmlDeviceGetPcieThroughput, nvml.NVML_PCIE_UTIL_TX_BYTES)
        pcie_rx = read("pcie_rx", nvml.nvmlDeviceGetPcieThroughput, nvml.NVML_PCIE_UTIL_RX_BYTES)
        ecc = nvml.nvmlDeviceGetTotalEccErrors
        ecc_c = read("ecc_corrected", ecc, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC)
        ecc_u = read("ecc_uncorrected", ecc, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
        nvlink_tx, nvlink_rx = self._nvlink_rates(device, errors)
        return GPUMetrics(
            index=device.index,
            uuid=device.uuid,
            name=device.name,
            utilization_percent=float(util.gpu) if util is not None else None,
            memory_copy_utilization_percent=float(util.memory) if util is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_free_bytes=int(memory.free) if memory is not None else None,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            sm_clock_mhz=sm_clock,
            sm_clock_max_mhz=device.sm_clock_max_mhz,
            throttle_mask=throttle,
            throttle_reasons=throttle_names(throttle) if throttle is not None else [],
            pcie_tx_bytes_per_s=pcie_tx * 1024.0 if pcie_tx is not None else None,
            pcie_rx_bytes_per_s=pcie_rx * 1024.0 if pcie_rx is not None else None,
            nvlink_active_links=device.nvlink_active_links,
            nvlink_tx_bytes_per_s=nvlink_tx,
            nvlink_rx_bytes_per_s=nvlink_rx,
            xid_errors=device.xid_errors if device.xid_supported else None,
            last_xid=device.last_xid,
            ecc_corrected=ecc_c,
            ecc_uncorrected=ecc_u,
            unsupported=sorted(device.unsupported),
            errors=errors,
        )

    def _nvlink_rates(self, device: _Device, errors: dict[str, str]) -> tuple[float | None, float | None]:
        """NVLink data throughput in bytes/s, from the cumulative KiB counters of two samples."""
        nvml = self._nvml
        if not device.nvlink_active_links:
            return None, None
        fields = [
            (nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS),
            (nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS),
        ]
        values = self._read(device, errors, "nvlink_throughput", nvml.nvmlDeviceGetFieldValues, fields)
        if values is None:
            return None, None
        if any(v.nvmlReturn != nvml.NVML_SUCCESS for v in values):
            device.unsupported.add("nvlink_throughput")
            return None, None
        now, tx, rx = time.monotonic(), int(values[0].value.ullVal), int(values[1].value.ullVal)
        previous, device.nvlink_counters = device.nvlink_counters, (now, tx, rx)
        if previous is None or now <= previous[0]:
            return None, None
        elapsed = now - previous[0]
        return (tx - previous[1]) * 1024.0 / elapsed, (rx - previous[2]) * 1024.0 / elapsed

    def close(self) -> None:
        if self._nvml is None:
            return
        nvml, self._nvml = self._nvml, None
        try:
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
        self._events = None
        self.status = "unavailable: the collector was closed"
