"""The NVML collector against a fake pynvml: units, unsupported fields, errors, XID events."""

from __future__ import annotations

import sys

import pynvml
import pytest
from fake_nvml import H100_MEMORY, FakeGpu, FakeNvml

from evalfleet.monitoring.nvml import NvmlCollector, throttle_names


def test_reads_every_field_in_the_units_the_snapshot_promises(fake_nvml):
    fake_nvml.gpus[1].utilization = 97
    fake_nvml.gpus[1].memory_used = 70 * 1024**3
    fake_nvml.gpus[1].power_mw = 612_500
    fake_nvml.gpus[1].throttle = pynvml.nvmlClocksThrottleReasonSwPowerCap
    collector = NvmlCollector(nvml=fake_nvml)

    assert collector.status == "available"
    assert collector.driver_version == "550.54.15"
    first, second = collector.collect()
    assert (first.index, second.index) == (0, 1)
    assert second.name == "NVIDIA H100 80GB HBM3"
    assert second.uuid == fake_nvml.gpus[1].uuid
    assert second.utilization_percent == 97.0
    assert second.memory_used_bytes == 70 * 1024**3
    assert second.memory_total_bytes == H100_MEMORY
    assert second.memory_free_bytes == H100_MEMORY - 70 * 1024**3
    assert second.power_w == pytest.approx(612.5)
    assert second.power_limit_w == pytest.approx(700.0)
    assert second.power_percent == pytest.approx(87.5)
    assert second.throttle_reasons == ["sw_power_cap"]
    assert first.throttle_reasons == ["gpu_idle"]
    assert first.sm_clock_mhz == 345 and first.sm_clock_max_mhz == 1980
    assert first.temperature_c == 33.0
    assert first.pcie_tx_bytes_per_s == 2_150 * 1024
    assert first.nvlink_active_links == 18
    assert first.ecc_corrected == 0 and first.ecc_uncorrected == 0
    assert first.xid_errors == 0 and first.last_xid is None
    assert first.unsupported == [] and first.errors == {}


def test_nvlink_throughput_is_a_rate_between_two_samples(fake_nvml):
    collector = NvmlCollector(nvml=fake_nvml)
    assert collector.collect()[0].nvlink_tx_bytes_per_s is None  # one reading of a counter is not a rate
    fake_nvml.gpus[0].nvlink_tx_kib += 10 * 1024 * 1024  # 10 GiB more sent
    fake_nvml.gpus[0].nvlink_rx_kib += 5 * 1024 * 1024
    gpu0 = collector.collect()[0]
    assert gpu0.nvlink_tx_bytes_per_s > 0
    assert gpu0.nvlink_tx_bytes_per_s == pytest.approx(2 * gpu0.nvlink_rx_bytes_per_s)


def test_unsupported_fields_are_none_named_and_not_asked_again():
    pcie_card = FakeGpu(0, name="NVIDIA L4", not_supported={
        "nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetNvLinkState",
        "nvmlDeviceGetPcieThroughput",
    })
    fake = FakeNvml([pcie_card])
    collector = NvmlCollector(nvml=fake)
    gpu = collector.collect()[0]
    assert gpu.power_w is None and gpu.power_percent is None
    assert gpu.ecc_corrected is None and gpu.pcie_rx_bytes_per_s is None
    assert gpu.nvlink_active_links is None and gpu.nvlink_tx_bytes_per_s is None
    assert {"power", "ecc_corrected", "pcie_tx"} <= set(gpu.unsupported)
    assert gpu.utilization_percent == 0.0  # supported fields still read, and a real zero stays zero
    calls = fake.calls["nvmlDeviceGetPowerUsage"]
    collector.collect()
    assert fake.calls["nvmlDeviceGetPowerUsage"] == calls == 1
    assert fake.calls["nvmlDeviceGetNvLinkState"] == 1  # asked once at start, for link 0


def test_other_errors_are_reported_and_retried(fake_nvml):
    fake_nvml.gpus[0].failing["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_GPU_IS_LOST
    collector = NvmlCollector(nvml=fake_nvml)
    gpu = collector.collect()[0]
    assert gpu.temperature_c is None
    assert "temperature" in gpu.errors and "temperature" not in gpu.unsupported
    del fake_nvml.gpus[0].failing["nvmlDeviceGetTemperature"]
    assert collector.collect()[0].temperature_c == 33.0


@pytest.mark.parametrize(
    "code, reason",
    [(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found"),
     (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded")],
)
def test_unavailable_nvml_is_reported_never_faked(code, reason):
    collector = NvmlCollector(nvml=FakeNvml(init_error=code))
    assert collector.status == f"unavailable: {reason}"
    assert not collector.available
    assert collector.collect() == []


def test_the_real_pynvml_on_this_machine_is_reported_as_unavailable():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML")
    collector = NvmlCollector()
    assert collector.status.startswith("unavailable: ")
    assert collector.collect() == []


def test_xid_events_are_counted_per_gpu(fake_nvml):
    collector = NvmlCollector(nvml=fake_nvml)
    fake_nvml.inject_xid(1, 79)
    fake_nvml.inject_xid(1, 48)
    gpu0, gpu1 = collector.collect()
    assert (gpu0.xid_errors, gpu1.xid_errors, gpu1.last_xid) == (0, 2, 48)
    gpu0, gpu1 = collector.collect()
    assert gpu1.xid_errors == 2  # counts are cumulative, not per sample


def test_gpus_without_xid_events_say_so():
    fake = FakeNvml([FakeGpu(0, not_supported={"nvmlDeviceRegisterEvents"}), FakeGpu(1)])
    gpu0, gpu1 = NvmlCollector(nvml=fake).collect()
    assert gpu0.xid_errors is None and gpu1.xid_errors == 0


def test_close_shuts_nvml_down(fake_nvml):
    collector = NvmlCollector(nvml=fake_nvml)
    collector.close()
    collector.close()
    assert fake_nvml.calls["nvmlShutdown"] == 1 and fake_nvml.event_sets_freed == 1
    assert collector.status.startswith("unavailable") and collector.collect() == []


def test_throttle_bits_follow_nvml_h():
    mask = pynvml.nvmlClocksThrottleReasonHwThermalSlowdown | pynvml.nvmlClocksThrottleReasonSwPowerCap
    assert throttle_names(mask) == ["sw_power_cap", "hw_thermal"]
    assert throttle_names(0) == []


def test_a_failure_while_listing_gpus_makes_nvml_unavailable():
    fake = FakeNvml([FakeGpu(0)])
    fake.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN))
    collector = NvmlCollector(nvml=fake)
    assert collector.status == "unavailable: Unknown Error" and collector.collect() == []
    assert fake.calls["nvmlShutdown"] == 1


def test_missing_pynvml_module_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    status = NvmlCollector().status
    assert status.startswith("unavailable: ") and "pynvml" in status


def test_xid_events_degrade_gracefully(fake_nvml):
    fake_nvml.nvmlEventSetCreate = lambda: (_ for _ in ()).throw(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED))
    assert [g.xid_errors for g in NvmlCollector(nvml=fake_nvml).collect()] == [None, None]


def test_events_other_than_xid_or_from_unknown_gpus_are_ignored(fake_nvml):
    collector = NvmlCollector(nvml=fake_nvml)
    fake_nvml.inject_xid(0, 31)
    fake_nvml.events[-1].eventType = pynvml.nvmlEventTypeSingleBitEccError
    fake_nvml.inject_xid(1, 13)
    fake_nvml.events[-1].device = FakeGpu(7)
    real_index = fake_nvml.nvmlDeviceGetIndex

    def index_of(handle):
        if handle.index >= 2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return real_index(handle)

    fake_nvml.nvmlDeviceGetIndex = index_of
    assert [g.xid_errors for g in collector.collect()] == [0, 0]
    assert not fake_nvml.events


def test_nvlink_counters_a_gpu_cannot_give_are_marked_unsupported():
    fake = FakeNvml([FakeGpu(0)])
    fake.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 9999  # a field id this GPU answers with NOT_SUPPORTED
    collector = NvmlCollector(nvml=fake)
    gpu = collector.collect()[0]
    assert gpu.nvlink_rx_bytes_per_s is None and "nvlink_throughput" in gpu.unsupported
    assert collector.device_count == 1


def test_close_survives_a_failing_shutdown(fake_nvml):
    fake_nvml.nvmlShutdown = lambda: (_ for _ in ()).throw(pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN))
    collector = NvmlCollector(nvml=fake_nvml)
    collector.close()
    assert not collector.available
