"""medsegx.runtime's CPU detection and the one --use_amp decision (detection monkeypatched: any machine)."""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch

from medsegx import runtime
from medsegx.inference.runner import SliceRunner
from medsegx.model import MedSegXOutput

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}
processor\t: 1
model name\t: second core
flags\t\t: fpu
"""


@pytest.mark.parametrize("extra, native", [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512_vnni", False)])
def test_proc_cpuinfo_flags_decide_when_torch_cannot_say(extra, native):
    info = runtime.detect_cpu(CPUINFO.format(extra=extra), torch_probe=False)
    assert info.model == "AMD EPYC 9B14" and info.source == "/proc/cpuinfo"
    assert info.native_bf16 is native
    assert ("native bf16: yes" in info.describe()) is native
    assert info.describe().startswith("CPU AMD EPYC 9B14 (torch capability ")


def test_nothing_known_is_unknown_not_false():
    info = runtime.detect_cpu("", torch_probe=False)
    assert info.native_bf16 is None and info.source == "unknown" and "native bf16: unknown" in info.describe()


def test_torch_probe_is_preferred_when_present(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    info = runtime.detect_cpu(CPUINFO.format(extra=""))
    assert info.source == "torch" and info.amx_bf16 and info.native_bf16 is True


@pytest.fixture
def cpu(monkeypatch):
    """Set what the detection says: cpu(True | False | None)."""
    def set_native(native):
        monkeypatch.setattr(runtime, "_CPU", runtime.CpuInfo("Test CPU", "AVX2", native, native, "test"))
        monkeypatch.setattr(runtime, "_WARNED", set())
    return set_native


def test_use_amp_stays_fp32_on_a_cpu_without_native_bf16(cpu, caplog):
    cpu(False)
    with caplog.at_level(logging.WARNING, logger="medsegx"):
        assert runtime.amp_allowed("cpu", True) is False
        assert runtime.amp_allowed("cpu", True) is False
    warnings = [r.getMessage() for r in caplog.records if "--use_amp" in r.getMessage()]
    assert len(warnings) == 1 and "Test CPU" in warnings[0] and "stays in float32" in warnings[0]
    with runtime.autocast(torch.device("cpu"), True, "bfloat16"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32
    assert runtime.amp_allowed("cpu", False) is False


@pytest.mark.parametrize("native", [True, None])
def test_use_amp_runs_bf16_where_native_or_unknown(cpu, native):
    cpu(native)
    assert runtime.amp_allowed("cpu", True) is True
    with runtime.autocast(torch.device("cpu"), True, None):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16


def test_cuda_is_not_affected(cpu):
    cpu(False)
    assert runtime.amp_allowed(torch.device("cuda", 0), True) is True
    assert runtime.amp_allowed("cuda", False) is False


class _Recorder(torch.nn.Module):
    """A model that records whether autocast was on during its forward."""

    def __init__(self):
        super().__init__()
        self.autocast = []

    def forward(self, image, box, modal, organ):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        b = len(image)
        return MedSegXOutput(torch.zeros(b, 3, 256, 256), torch.zeros(b, 3), torch.zeros(0, b, 0))


@pytest.mark.parametrize("native", [False, True])
def test_the_runner_and_setup_apply_the_decision(cpu, native):
    cpu(native)
    model = _Recorder()
    runner = SliceRunner(model, "cpu", amp=True)
    runner.forward([np.zeros((256, 256, 3), np.uint8)], [np.array([1, 1, 9, 9])], [0], [[1, 4, 17, 59]])
    assert runner.amp is native and model.autocast == [native]
    args = argparse.Namespace(use_amp=True, seed=0, threads=None, device_ids=[])
    runtime.setup(args, None)
    assert args.use_amp is native  # run_info.json and the logs record the resolved value


def test_setup_logs_the_cpu_and_native_bf16(cpu, caplog):
    cpu(True)
    with caplog.at_level(logging.INFO, logger="medsegx"):
        runtime.log_machine()
    assert any("CPU Test CPU (torch capability AVX2), native bf16: yes" in r.getMessage() for r in caplog.records)
