"""What runs a reward model's forward pass: torch or onnxruntime, each at one precision.

A backend takes one padded batch (int64 tensors, (B, T): token ids, attention mask, token type ids or None) and
returns float32 logits (B, num_labels) on the CPU. The Scorer builds the batch and turns logits into scores; a
backend only runs the model. How ONNX graphs are made and cached: onnx_cache.py; how `auto` picks: calibration.py.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch

from shared.modeling import ModelLoadError

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Tolerance:
    """How far a backend's outputs may be from float32 torch: every probability within `max_abs_prob`, and (where
    set) at least this fraction of text pairs ranked in the same order by the reward label's probability."""

    max_abs_prob: float
    min_rank_agreement: float | None = None


# The one place the tolerances live (the README states them); `auto` refuses a candidate outside its tolerance.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("torch", "float32"): Tolerance(0.0),
    ("onnx", "float32"): Tolerance(1e-4),
    ("torch", "bfloat16"): Tolerance(5e-3),
    ("torch", "float16"): Tolerance(5e-3),
    ("onnx", "int8"): Tolerance(2e-2, min_rank_agreement=0.99),
}


class Batch(NamedTuple):
    """One padded batch, int64 (B, T) each; `types` only for pair input to a model that takes token type ids."""

    ids: torch.Tensor
    mask: torch.Tensor
    types: torch.Tensor | None = None


class Backend(Protocol):
    kind: str  # torch | onnx
    dtype: str

    def run(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        """(B, num_labels) float32 logits on the CPU for a padded batch."""


class TorchBackend:
    """The model itself, float16 on a GPU with its weights cast once: autocast's per-call casts made float16 slower
    than float32 there (H200, batch 32). Other lower precisions run under autocast (float32 weights, bfloat16
    matmuls): bfloat16 weights throughout were just outside bfloat16's tolerance. `shared`: the float32 model also
    serves other backends (auto), so the float16 cast takes a copy."""

    kind = "torch"

    def __init__(self, model: torch.nn.Module, device: str, dtype: str, shared: bool = False):
        if dtype not in _TORCH_DTYPES:
            raise ModelLoadError(f"backend torch does not take dtype {dtype}")
        gpu = torch.device(device).type == "cuda"
        if dtype == "float16" and not gpu:
            raise ModelLoadError("dtype float16 needs a GPU (device cuda); on a CPU use bfloat16, or backend onnx "
                                 "with dtype int8")
        if dtype == "float16":
            model = (copy.deepcopy(model) if shared else model).to(torch.float16)
        self.model, self.device, self.dtype = model, device, dtype

    def _precision(self):
        if self.dtype in ("float32", "float16"):  # float16: the weights are float16 already
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=_TORCH_DTYPES[self.dtype])

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if types is not None:
            inputs["token_type_ids"] = types.to(self.device)
        with self._precision():
            return self.model(**inputs).logits.float().cpu()


class OnnxBackend:
    """An onnxruntime session over an exported graph (inputs input_ids, attention_mask[, token_type_ids])."""

    kind = "onnx"

    def __init__(self, session, dtype: str):
        self.session, self.dtype = session, dtype
        self._inputs = {i.name for i in session.get_inputs()}

    def run(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        if types is None and "token_type_ids" in self._inputs:  # a BERT-like model scoring one text: all segment 0
            types = torch.zeros_like(ids)
        if self.dtype != "int8":
            return self._run(ids, mask, types)
        # Dynamic int8 scales each MatMul's activations by the largest value in the batch: in a batch, one text's
        # outlier moves every other text's score (up to 5e-2 on the tiny model). Alone, without its padding, a text's
        # score depends on the text only; on a CPU that is also faster than a padded batch.
        rows = []
        for row in range(ids.shape[0]):
            real = slice(0, int(mask[row].sum()))  # right padding: the real tokens come first
            rows.append(self._run(ids[row : row + 1, real], mask[row : row + 1, real],
                                  None if types is None else types[row : row + 1, real]))
        return torch.cat(rows)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if types is not None:
            feed["token_type_ids"] = types.numpy()
        (logits,) = self.session.run(["logits"], feed)
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def onnx_providers(device: str) -> list[str]:
    """CUDA first when the model is on a GPU and this onnxruntime build has it; the CPU always."""
    import onnxruntime as ort

    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path, device: str, optimized: Path | None = None):
    """An onnxruntime session with every graph optimization, on torch's thread count (the service's setting).

    `optimized`: where onnxruntime saves the graph it optimized, so the next load starts from it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads spinning for work would take CPU from the event loop that feeds the batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: it warns about every unused initializer otherwise
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=onnx_providers(device))


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them bfloat16 on a CPU is emulated and slower than float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return True
    with contextlib.suppress(Exception):  # older torch has no get_cpu_capability
        return "AMX" in torch.backends.cpu.get_cpu_capability().upper()
    return False
