"""What a failed job's GPUs say about themselves (NVML faked at the pynvml boundary)."""

from __future__ import annotations

from fake_nvml import FakeGpu, FakeNvml

from evalfleet.orchestrator.failures import DeviceWatch, FailureClass, exit_report


def test_xid_events_and_new_ecc_errors_on_the_jobs_gpus_are_evidence():
    nvml = FakeNvml([FakeGpu(i, ecc_uncorrected=5 if i == 2 else 0) for i in range(4)])
    watch = DeviceWatch([(0, 1), (0, 2)], nvml=nvml)
    assert watch.evidence() == []  # ECC errors from before the job are not its evidence
    nvml.inject_xid(1, 79)
    nvml.inject_xid(3, 48)  # another job's GPU
    nvml.gpus[2].ecc_uncorrected = 7
    found = {tuple(item.device): item.findings for item in watch.evidence()}
    assert found == {(0, 1): ["Xid 79 (1 event)"], (0, 2): ["2 uncorrected ECC errors"]}
    watch.close()


def test_a_device_that_reports_faults_makes_any_failure_infrastructure():
    nvml = FakeNvml([FakeGpu(0)])
    watch = DeviceWatch([(0, 0)], nvml=nvml)
    error = ValueError("something odd")
    assert exit_report(error, "odd", watch.evidence()).failure is FailureClass.DETERMINISTIC
    nvml.inject_xid(0, 31)
    report = exit_report(error, "odd", watch.evidence())
    assert report.failure is FailureClass.INFRASTRUCTURE and report.evidence[0].findings == ["Xid 31 (1 event)"]
    watch.close()


def test_no_nvml_or_no_placement_finds_nothing():
    assert DeviceWatch([]).evidence() == []
    broken = FakeNvml([FakeGpu(0)], init_error=9)
    assert DeviceWatch([(0, 0)], nvml=broken).evidence() == []
