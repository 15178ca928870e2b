"""ONNX graphs of a loaded model: exported once, cached by what shapes them, opened with onnxruntime.

An entry is `<root>/<dtype>-<key>/model.onnx`, the key a hash of the weights, the (resolved) config, the export
settings, the dtype and the library versions, so any change makes a new entry. `<root>` is `<model dir>/.onnx-cache`
when that folder can be written, else `$RLHF_CACHE_DIR/onnx` or `~/.cache/rlhf/onnx` (an entry already in the
model's folder is used even when that folder is read-only). Entries are built in a scratch folder and renamed into
place, so a reader never sees half of one; one that does not load is deleted and built again, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from services.reward.backends import Batch, OnnxBackend, onnx_providers, open_session
from shared.modeling import ModelLoadError, looks_local

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# Everything about the export that is not the model; change it (or `version`) and every cached graph is rebuilt.
EXPORT_SETTINGS = {"exporter": "torch.onnx dynamo", "opset": 18, "int8": "quantize_dynamic QInt8 MatMul",
                   "version": 1}
# An exported float32 graph must give torch's logits to this (absolute, on logits scaled to at least 1).
EXPORT_CHECK = 1e-3
_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit: larger weights go to a side file


def cache_roots(source: str) -> list[Path]:
    """Where entries may be: the model's own folder first (local models), then the user cache."""
    base = os.environ.get("RLHF_CACHE_DIR")
    fallback = Path(base).expanduser() / "onnx" if base else Path.home() / ".cache" / "rlhf" / "onnx"
    path = Path(source).expanduser()
    local = [path / ".onnx-cache"] if looks_local(source) and path.is_dir() else []
    return [*local, fallback]


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK)


def model_digest(model: torch.nn.Module, with_types: bool) -> str:
    """Hash of what the graph is made from: every weight, the config, the export settings, the library versions."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    h.update(model.config.to_json_string(use_diff=False).encode())
    h.update(repr(sorted(EXPORT_SETTINGS.items())).encode())
    h.update(f"token_type_ids={with_types}".encode())
    for lib in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            h.update(f"{lib}={metadata.version(lib)}".encode())
    return h.hexdigest()


def _build_entry(roots: list[Path], name: str, build: Callable[[Path], None]) -> Path:
    """The entry `name`: an existing one, else built into a scratch folder and renamed into the first writable root."""
    for root in roots:
        if (root / name / MODEL_FILE).is_file():
            return root / name
    root = next((r for r in roots if _writable(r)), None)
    if root is None:
        raise ModelLoadError(f"no writable folder for the ONNX cache (tried {', '.join(map(str, roots))}); set "
                             "RLHF_CACHE_DIR to one")
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(scratch)
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            scratch.rename(root / name)
        except OSError:  # another process renamed its copy first: the same graph, keep theirs
            if not (root / name / MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root / name


class _Logits(torch.nn.Module):
    """The classifier as a function of plain tensors to logits, which is what the exporter traces."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _TypedLogits(_Logits):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def _inputs(batch: Batch, with_types: bool, device: str | torch.device) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": batch.ids, "attention_mask": batch.mask}
    if with_types:
        inputs["token_type_ids"] = batch.types if batch.types is not None else torch.zeros_like(batch.ids)
    return {k: v.to(device) for k, v in inputs.items()}


def export(model: torch.nn.Module, path: Path, probes: list[Batch], with_types: bool, max_length: int) -> None:
    """torch.onnx.export (dynamo; the legacy tracer bakes transformers' Python-side mask logic into constants and
    gives wrong logits at other shapes), dynamic batch and sequence axes, then checked against torch on `probes`."""
    device = next(model.parameters()).device
    wrapper = (_TypedLogits if with_types else _Logits)(model).eval()
    example = _inputs(probes[0], with_types, device)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1, max=max_length)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    try:
        with torch.no_grad(), warnings_quiet():
            torch.onnx.export(wrapper, (), str(path), kwargs=example, input_names=list(example),
                              output_names=["logits"], dynamic_shapes={k: {0: batch, 1: seq} for k in example},
                              opset_version=EXPORT_SETTINGS["opset"], dynamo=True, external_data=big, verbose=False)
    except Exception as exc:  # noqa: BLE001 - unsupported ops, data-dependent control flow: all one answer
        raise ModelLoadError(f"this model cannot be exported to ONNX ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); use backend torch") from exc
    session = open_session(path, "cpu")
    for probe in probes:
        with torch.inference_mode():
            want = wrapper(**_inputs(probe, with_types, device)).float().cpu()
        got = OnnxBackend(session, "float32").run(*probe)
        error = ((got - want).abs() / want.abs().clamp(min=1)).max().item()
        if not error <= EXPORT_CHECK:
            raise ModelLoadError(f"the ONNX export of this model gives logits {error:.2g} away from torch's (more "
                                 f"than {EXPORT_CHECK:g}); use backend torch")


def quantize(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic int8 quantization: int8 weights, activations quantized per batch at run time.

    MatMuls only: they are the time, and leaving the embeddings (Gather) in float32 keeps probabilities 8x closer to
    float32's (max 0.005 against 0.04 on the tiny sentiment model's held-out texts)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = any(p.suffix != ".onnx" for p in src.parent.iterdir())
    with warnings_quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         use_external_data_format=external)


@contextlib.contextmanager
def warnings_quiet():
    """The exporter and the quantizer log every step (onnx_ir at INFO, the quantizer on the root logger) and warn
    about things that do not apply here: keep that out of the service's log while they run."""
    root = logging.getLogger()
    drop = logging.Filter("__nothing__")  # a name no record has: every record on the root logger is dropped
    chatty = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in chatty]
    root.addFilter(drop)
    for logger in chatty:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop)
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)


def _optimized(entry: Path, device: str) -> Path:
    """Where onnxruntime's optimized graph is kept: it depends on the execution providers and the CPU's features."""
    tag = hashlib.sha256(f"{onnx_providers(device)}:{torch.backends.cpu.get_cpu_capability()}".encode())
    return entry / f"model.opt-{tag.hexdigest()[:12]}.onnx"


def _open(entry: Path, device: str):
    """A session on the entry's graph, from onnxruntime's optimized copy when there is one (saved on first open)."""
    optimized = _optimized(entry, device)
    if optimized.is_file():
        return open_session(optimized, device)
    if not os.access(entry, os.W_OK):
        return open_session(entry / MODEL_FILE, device)
    scratch = entry / f".{optimized.name}.{os.getpid()}"
    try:
        session = open_session(entry / MODEL_FILE, device, optimized=scratch)
        if scratch.is_file():
            scratch.replace(optimized)  # atomic: a reader sees the whole file or none
    finally:
        scratch.unlink(missing_ok=True)
    return session


def load_onnx(model: torch.nn.Module, dtype: str, device: str, source: str, probes: list[Batch], with_types: bool,
              max_length: int) -> OnnxBackend:
    """The model as an OnnxBackend at `dtype` (float32 or int8), from the cache or exported into it."""
    if dtype not in ("float32", "int8"):
        raise ModelLoadError(f"backend onnx does not take dtype {dtype}: it takes float32 or int8")
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" not in onnx_providers(device):
        log.warning("%s: this onnxruntime has no CUDA provider (onnxruntime-gpu): the graph runs on the CPU", source)
    roots, digest = cache_roots(source), model_digest(model, with_types)
    names = {d: f"{d}-{hashlib.sha256(f'{digest}:{d}'.encode()).hexdigest()[:24]}" for d in ("float32", "int8")}

    def make_float32() -> Path:
        return _build_entry(roots, names["float32"],
                            lambda tmp: export(model, tmp / MODEL_FILE, probes, with_types, max_length))

    def make() -> Path:
        if dtype == "float32":
            return make_float32()
        parent = make_float32()
        return _build_entry(roots, names["int8"], lambda tmp: quantize(parent / MODEL_FILE, tmp / MODEL_FILE))

    for attempt in (1, 2):
        try:
            entry = make()
            return OnnxBackend(_open(entry, device), dtype)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime and onnx raise their own types for a damaged file
            if attempt == 2:
                raise ModelLoadError(f"cannot load the cached ONNX graph of {source!r}: {exc}") from exc
            log.warning("%s: the cached ONNX graph does not load (%s); exporting it again", source, exc)
            for root in roots:
                for name in {names["float32"], names[dtype]}:
                    shutil.rmtree(root / name, ignore_errors=True)
    raise AssertionError("unreachable")
