"""`train.mixed_precision`: validation at load, and what `auto` resolves to on each kind of machine."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.trainer import precision
from services.trainer.config import load_config
from services.trainer.precision import Capabilities, MixedPrecisionError, cpu_bf16_flags, describe, resolve
from services.trainer.trlx_engine import check_trlx_config
from services.trainer.trlx_format import TrlxConfigError
from tests.conftest import ROOT

CPU_PLAIN = Capabilities(cuda=False, cuda_bf16=False, cpu_bf16=False)
CPU_BF16 = Capabilities(cuda=False, cuda_bf16=False, cpu_bf16=True, cpu_bf16_reason="avx512_bf16")
GPU_BF16 = Capabilities(cuda=True, cuda_bf16=True, cpu_bf16=False)
GPU_OLD = Capabilities(cuda=True, cuda_bf16=False, cpu_bf16=True)  # e.g. a V100 (no bf16) in a bf16-capable host


def tiny(*sets: str):
    return load_config(ROOT / "configs" / "tiny.yaml", list(sets))


@pytest.fixture
def machine(monkeypatch):
    """Pretend to run on the given capabilities."""
    def use(caps: Capabilities) -> None:
        monkeypatch.setattr(precision, "detect", lambda: caps)
    return use


@pytest.mark.parametrize("caps, expected", [(CPU_PLAIN, "no"), (CPU_BF16, "bf16"), (GPU_BF16, "bf16"),
                                            (GPU_OLD, "no")])
def test_auto_is_bf16_only_where_the_hardware_computes_it(caps, expected):
    assert resolve("auto", caps) == expected


@pytest.mark.parametrize("caps", [CPU_PLAIN, CPU_BF16, GPU_BF16, GPU_OLD])
def test_no_is_always_no(caps):
    assert resolve("no", caps) == "no"


def test_explicit_choices_where_they_run():
    assert resolve("bf16", CPU_PLAIN) == "bf16"  # emulated, slow, but correct: the user asked for it
    assert resolve("bf16", GPU_BF16) == "bf16"
    assert resolve("fp16", GPU_OLD) == "fp16"
    assert resolve("fp16", GPU_BF16) == "fp16"


@pytest.mark.parametrize("caps", [CPU_PLAIN, CPU_BF16])
def test_fp16_on_the_cpu_is_refused(caps):
    with pytest.raises(MixedPrecisionError, match="fp16 needs a CUDA GPU"):
        resolve("fp16", caps)


def test_bf16_on_a_gpu_without_it_is_refused():
    with pytest.raises(MixedPrecisionError, match="does not support bf16"):
        resolve("bf16", GPU_OLD)


def test_cpu_flags_are_read_from_cpuinfo():
    with_bf16 = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n"
    with_amx = "flags\t\t: fpu amx_tile amx_bf16 amx_int8\n"
    assert cpu_bf16_flags(with_bf16) == ["avx512_bf16"]
    assert cpu_bf16_flags(with_amx) == ["amx_bf16"]
    assert cpu_bf16_flags("flags\t\t: fpu sse avx2 avx512f\n") == []


def test_the_default_is_auto_and_resolves_at_run_time(machine):
    machine(CPU_PLAIN)
    assert tiny().train.mixed_precision == "auto"


@pytest.mark.parametrize("value", ["bf16", "no", "auto"])
def test_set_override_takes_every_cpu_choice(machine, value):
    machine(CPU_BF16)
    assert tiny(f"train.mixed_precision={value}").train.mixed_precision == value  # `no` is YAML false: still "no"


@pytest.mark.parametrize("value", ["fp32", "float16", "true", "1", "BF16"])
def test_a_bad_value_is_a_clear_error(value):
    with pytest.raises(ValidationError, match="mixed_precision") as info:
        tiny(f"train.mixed_precision={value}")
    assert "'no', 'bf16', 'fp16' or 'auto'" in str(info.value)


def test_fp16_without_a_gpu_fails_at_load(machine):
    machine(CPU_BF16)
    with pytest.raises(ValidationError, match="fp16 needs a CUDA GPU"):
        tiny("train.mixed_precision=fp16")


def test_fp16_with_a_gpu_loads(machine):
    machine(GPU_BF16)
    assert tiny("train.mixed_precision=fp16").train.mixed_precision == "fp16"


def test_the_trlx_engine_refuses_a_mixed_precision_it_would_ignore(machine):
    machine(CPU_BF16)
    sets = ["train.engine=trlx", "model.num_layers_unfrozen=2", "method.max_grad_norm=null"]
    check_trlx_config(tiny(*sets, "train.mixed_precision=auto"))
    with pytest.raises(TrlxConfigError, match="train.mixed_precision is bf16"):
        check_trlx_config(tiny(*sets, "train.mixed_precision=bf16"))


def test_the_log_line_says_why():
    assert describe("auto", "bf16", CPU_BF16) == "mixed precision: bf16 (train.mixed_precision auto: the CPU has " \
                                                 "avx512_bf16)"
    assert describe("auto", "no", CPU_PLAIN).endswith("auto: the CPU has no bf16 instructions)")
    assert describe("auto", "no", GPU_OLD).endswith("auto: the GPU has no bf16)")
    assert describe("no", "no", GPU_BF16) == "mixed precision: no (train.mixed_precision no)"
