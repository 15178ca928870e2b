"""`train.mixed_precision`: which precision the forward passes run in, and the accelerator that runs them.

Mixed precision here means autocast: the master weights, the optimizer state and every loss-side number (log-probs,
values, advantages, KL, the PPO loss) stay float32; only the matmuls of forward (and so backward) passes run in
bf16 or fp16. `auto` picks bf16 where the hardware computes it natively, else full precision.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHOICES = ("no", "bf16", "fp16", "auto")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot-product instructions


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers, as `resolve` needs it (tests pass their own)."""

    cuda: bool
    cuda_bf16: bool
    cpu_bf16: bool
    cpu_bf16_reason: str = ""  # the flags that made cpu_bf16 true, for the log


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's bf16 instruction sets (AVX-512 BF16, AMX), from /proc/cpuinfo or, where that is absent, torch."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = None
    if cpuinfo is not None:
        flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                          if line.startswith("flags")), []))
        return [f for f in _CPU_BF16_FLAGS if f in flags]
    import torch

    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return [flag for flag, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]


def detect() -> Capabilities:
    import torch

    cuda = torch.cuda.is_available()
    flags = cpu_bf16_flags()
    return Capabilities(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(), cpu_bf16=bool(flags),
                        cpu_bf16_reason=", ".join(flags))


class MixedPrecisionError(ValueError):
    """A `train.mixed_precision` this machine cannot run; the message says what to use instead."""


def resolve(requested: str, caps: Capabilities | None = None) -> str:
    """`no`, `bf16` or `fp16` for `requested` on this machine (or on `caps`)."""
    if requested not in CHOICES:
        raise MixedPrecisionError(f"train.mixed_precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    caps = caps or detect()
    if requested == "auto":
        native = caps.cuda_bf16 if caps.cuda else caps.cpu_bf16
        return "bf16" if native else "no"
    if requested == "fp16" and not caps.cuda:
        raise MixedPrecisionError("train.mixed_precision=fp16 needs a CUDA GPU: on the CPU accelerate neither "
                                  "autocasts nor scales fp16 (it would train in float32) and torch's fp16 kernels "
                                  "there are slow; use bf16, auto or no")
    if requested == "bf16" and caps.cuda and not caps.cuda_bf16:
        raise MixedPrecisionError("train.mixed_precision=bf16: this GPU does not support bf16; use fp16, auto or no")
    return requested


def describe(requested: str, resolved: str, caps: Capabilities | None = None) -> str:
    """One line for the log: what runs and why."""
    if requested != "auto":
        return f"mixed precision: {resolved} (train.mixed_precision {requested})"
    caps = caps or detect()
    if caps.cuda:
        why = "the GPU supports bf16" if resolved == "bf16" else "the GPU has no bf16"
    else:
        why = f"the CPU has {caps.cpu_bf16_reason}" if resolved == "bf16" else "the CPU has no bf16 instructions"
    return f"mixed precision: {resolved} (train.mixed_precision auto: {why})"


def autocast(device: str, precision: str):
    """The autocast every forward pass of the loop runs under (a no-op for `no`); float32 stays float32 outside."""
    import torch

    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_accelerator(precision: str):
    """An Accelerator with `precision` (it autocasts the prepared model's forward and, for fp16, scales the loss).

    Accelerate keeps one process-wide state that refuses a second precision; a process that builds trainers of
    different precisions in turn (tests, benchmarks) gets that state reset: the process group and device are kept.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched and launched != precision:
        log.warning("accelerate launch asked for mixed precision %s; train.mixed_precision gives %s", launched,
                    precision)
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
