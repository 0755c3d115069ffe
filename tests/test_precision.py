"""The precision choice (model/precision.py) on both kinds of CPU — the capability and the probe's figures are passed
in, torch is real — and that bf16 autocast training tracks float32's losses where this CPU has bf16."""

import pytest
import torch

from lmforge.errors import UserError
from lmforge.model import precision
from lmforge.model.precision import CpuCapability, GemmProbe, Precision, choose_cpu_training, cpu_capability

ZEN3 = CpuCapability("AMD EPYC 7B13", frozenset({"avx2", "fma"}))  # no AVX-512: bf16 is emulated
ZEN4 = CpuCapability("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
XEON_AMX = CpuCapability("Intel(R) Xeon(R) Processor", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
FAST = GemmProbe((256, 576, 1536), fp32_gflops=90.0, bf16_gflops=290.0)
SLOW = GemmProbe((256, 576, 1536), fp32_gflops=90.0, bf16_gflops=95.0)


def never_probed() -> GemmProbe:
    raise AssertionError("the probe must not run when the flags already rule bf16 out")


@pytest.mark.parametrize("requested", ["auto", "bf16", "bfloat16", None])
def test_cpu_without_native_bf16_trains_in_float32_and_says_why(requested):
    chosen = choose_cpu_training(requested, ZEN3, 576, never_probed)
    assert chosen.autocast is None and chosen.load_dtype == torch.float32
    assert "AMD EPYC 7B13 has no native bf16" in chosen.reason and "amx_bf16 / avx512_bf16" in chosen.reason


@pytest.mark.parametrize("capability", [ZEN4, XEON_AMX])
@pytest.mark.parametrize("requested", ["auto", "bf16", "bfloat16"])
def test_cpu_with_fast_bf16_trains_under_bf16_autocast_with_float32_parameters(capability, requested):
    chosen = choose_cpu_training(requested, capability, 576, lambda: FAST)
    assert chosen.autocast == torch.bfloat16 and chosen.load_dtype == torch.float32
    assert capability.bf16_instructions[0] in chosen.reason and "3.2× fp32" in chosen.reason
    assert "bf16 290 vs fp32 90 GFLOP/s at 256×576×1536" in chosen.reason


def test_bf16_flags_without_a_fast_probe_stay_float32():
    chosen = choose_cpu_training("bf16", ZEN4, 576, lambda: SLOW)
    assert chosen.autocast is None
    assert "not fast enough here" in chosen.reason and "1.1× < 1.3×" in chosen.reason


def test_float32_requested_is_float32_everywhere():
    for capability in (ZEN3, XEON_AMX):
        assert choose_cpu_training("fp32", capability, 576, never_probed).autocast is None


def test_auto_keeps_small_models_in_float32_but_an_explicit_bf16_is_measured():
    assert choose_cpu_training("auto", XEON_AMX, 64, never_probed).autocast is None
    assert choose_cpu_training("bf16", XEON_AMX, 64, lambda: FAST).autocast == torch.bfloat16


def test_float16_on_cpu_trains_in_float32_with_the_reason():
    chosen = choose_cpu_training("fp16", XEON_AMX, 576, never_probed)
    assert chosen.autocast is None and "float16 requested" in chosen.reason


def test_unknown_precision_name_lists_valid_values():
    with pytest.raises(UserError, match="valid values: auto, float32"):
        choose_cpu_training("float8", XEON_AMX, 576, never_probed)


def test_cpuinfo_is_read_for_model_and_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_bf16\n")
    capability = cpu_capability(cpuinfo)
    assert capability.model == "Test CPU 9000" and capability.bf16_instructions == ["amx_bf16"]
    assert capability.describe() == "Test CPU 9000 (avx2, avx512f, amx_bf16)"
    assert cpu_capability(tmp_path / "missing").flags == frozenset()


def test_the_real_probe_measures_both_precisions():
    measured = precision.probe_gemm(64, 128, tokens=32)
    assert measured.fp32_gflops > 0 and measured.bf16_gflops > 0 and measured.shape == (32, 64, 128)
    assert precision.probe_gemm(64, 128, tokens=32) is measured  # cached per process


def test_autocast_context_runs_matmuls_in_bf16_and_keeps_float32_parameters():
    linear = torch.nn.Linear(8, 4)
    bf16 = Precision(torch.float32, torch.bfloat16, "test")
    with bf16.context()():
        out = linear(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and linear.weight.dtype == torch.float32
    with Precision(torch.float32, None, "test").context()():
        assert linear(torch.randn(2, 8)).dtype == torch.float32
