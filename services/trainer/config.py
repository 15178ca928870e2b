"""The training job's configuration: trlX-like sections (train, model, tokenizer, optimizer, scheduler, method) plus
reward, data and generator. YAML in, validated at start, overridable with `--set section.key=value`."""

from __future__ import annotations

import copy
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from shared.runtime import available_cores
from shared.settings import read_yaml

# How long a stop (Ctrl-C or SIGTERM under `rlhf up`, a container stop) lets the trainer finish its iteration and
# save before it is killed: one iteration plus one save, measured (fsync included):
#   tiny preset, 2 CPU cores: 0.7 s + 0.05 s (a 7 MB checkpoint);
#   imdb preset (GPT-2 124M, 128 rollouts, 4 epochs) on an H100: 1.3-1.6 s + 2.1-3.4 s (1.5 GB: weights, Adam state);
#   imdb preset on CPU: about 440 CPU-seconds + 13 s, so 2-3 minutes on 4 free cores (830 s on 2 busy ones: raise
#   RLHF_STOP_GRACE on such a machine).
# 300 s covers the GPU run many times over and a 4-core CPU run; a stop waits only as long as the save takes.
DEFAULT_STOP_GRACE_S = 300.0
STOP_GRACE_ENV = "RLHF_STOP_GRACE"


def stop_grace_s(value: float | None = None) -> float:
    """`value`, else the RLHF_STOP_GRACE environment variable, else the default; seconds, positive."""
    raw = value if value is not None else os.environ.get(STOP_GRACE_ENV) or DEFAULT_STOP_GRACE_S
    try:
        grace = float(raw)
    except ValueError:
        raise ValueError(f"{STOP_GRACE_ENV} must be a number of seconds, got {raw!r}") from None
    if not grace > 0:
        raise ValueError(f"the stop grace must be positive, got {raw!r}")
    return grace


def key_or_env(key: str | None, variable: str) -> str | None:
    """A client key from the config, else from the environment (compose sets it in the trainer's container)."""
    return key or os.environ.get(variable) or None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainConfig(_Section):
    engine: Literal["native", "trlx"] = Field("native", description="`native`: this project's PPO loop; `trlx`: "
                                              "CarperAI/trlx itself, in its own environment (see docs/trlx.md).")
    total_steps: int = Field(100, ge=1, description="PPO iterations (rollout + update), not optimizer steps (a trlX "
                             "config file is translated: see docs/trlx.md).")
    batch_size: int = Field(32, ge=1, description="Rollouts per minibatch of the PPO update.")
    seq_length: int = Field(1024, ge=8, description="Longest prompt + response, in tokens.")
    eval_interval: float = Field(10, gt=0, description="Evaluate at the end of each iteration in which a multiple of "
                                 "this many iterations is reached (and at the end); fractional when translated from "
                                 "trlX's optimizer steps.")
    checkpoint_interval: float = Field(10, gt=0, description="Checkpoint likewise (and at the end).")
    checkpoint_dir: Path = Field(Path("runs"), description="Root of `<run>/step-<N>/` checkpoints.")
    run_name: str = Field("ppo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="Run folder name.")
    seed: int = Field(1000, description="Seeds data order, sampling and the value head.")
    resume: bool = Field(True, description="Continue from the run's last checkpoint when there is one.")
    keep_checkpoints: int = Field(0, ge=0, description="Keep only the newest N (0 keeps all; `best` always kept).")
    eval_samples_per_prompt: int = Field(2, ge=1, description="Samples averaged per eval prompt (less noise).")
    torch_threads: int = Field(default_factory=available_cores, ge=1, description="torch intra-op threads; default: "
                               "the cores this process may use.")
    tensorboard: bool = Field(True, description="Also log to TensorBoard when it is installed.")
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        "auto", description="Forward passes (rollouts, reference, updates) under bf16/fp16 autocast; weights, "
        "optimizer state and the PPO math stay float32. `auto`: bf16 on a GPU that supports it or a CPU with "
        "AVX-512 BF16 or AMX, else `no`. fp16 needs a GPU (loss scaling). Native engine only.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @field_validator("mixed_precision")
    @classmethod
    def _runs_here(cls, value: str) -> str:
        if value in ("bf16", "fp16"):  # fp16 without a GPU fails at load, not after the models load
            from services.trainer import precision

            precision.resolve(value)
        return value


class ModelConfig(_Section):
    model_path: str = Field(description="Policy to fine-tune: a local folder or a hub id.")
    revision: str | None = None
    value_head_hidden: int | None = Field(None, description="Value head width; default 2 x hidden (as trlX).")
    num_layers_unfrozen: int = Field(-1, ge=-1, description="Train only the top N blocks (embeddings and lower blocks "
                                     "frozen) with a hydra reference sharing the frozen trunk; -1: every parameter "
                                     "trains, against a full frozen copy (trlX's semantics).")


class TokenizerConfig(_Section):
    tokenizer_path: str | None = Field(None, description="Default: model.model_path.")
    truncation_side: Literal["left", "right"] = "right"


class OptimizerConfig(_Section):
    """torch's optimizer of that name, given `kwargs` as they are (as trlX does)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"lr": 3e-5, "betas": (0.9, 0.95), "eps": 1e-8,
                                                            "weight_decay": 1e-6})

    @model_validator(mode="after")
    def _kwargs_fit(self) -> OptimizerConfig:
        import torch

        try:
            self.build([torch.nn.Parameter(torch.zeros(1))])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"optimizer.kwargs do not fit torch's {self.name}: {exc}") from None
        return self

    def build(self, params):
        import torch

        kwargs = self.kwargs
        if self.name in ("adam", "adamw") and not {"fused", "foreach"} & set(kwargs):
            # The same update in one kernel instead of ~10 ops per tensor: on 2 CPU cores AdamW's step on GPT-2
            # small took 0.2 s unfused, 0.03 s fused. `fused: false` in kwargs turns it off.
            kwargs = {**kwargs, "fused": True}
        return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[self.name](
            params, **kwargs)


class SchedulerConfig(_Section):
    """Stepped after every optimizer step (as trlX), so `kwargs` count optimizer steps. `cosine_annealing`: torch's
    CosineAnnealingLR (T_max default: the run's optimizer steps); `linear`: torch's LinearLR (default: from the full
    rate down to 0 over the run); `constant`: no schedule."""

    name: Literal["cosine_annealing", "linear", "constant"] = "constant"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kwargs_fit(self) -> SchedulerConfig:
        import torch

        try:
            self.build(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"scheduler.kwargs do not fit {self.name}: {exc}") from None
        return self

    def build(self, optimizer, total_steps: int):
        from torch.optim import lr_scheduler

        if self.name == "cosine_annealing":
            return lr_scheduler.CosineAnnealingLR(optimizer, **{"T_max": total_steps, **self.kwargs})
        if self.name == "linear":
            return lr_scheduler.LinearLR(optimizer, **{"start_factor": 1.0, "end_factor": 0.0,
                                                       "total_iters": total_steps, **self.kwargs})
        if self.kwargs:
            raise ValueError("a constant schedule takes no kwargs")
        return lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class GenKwargs(BaseModel):
    """Keyword arguments of `generate`: the ones below are checked, others (as trlX allows) pass through."""

    model_config = ConfigDict(extra="allow")
    max_new_tokens: int = Field(40, ge=1)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    do_sample: bool = True
    temperature: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _known_arguments(self) -> GenKwargs:
        """Checked at load, not when the first rollout would fail: every extra must be a `generate` setting, and
        none may change the shape of what it returns (one sequence per prompt)."""
        from transformers import GenerationConfig

        known = set(GenerationConfig().to_dict())
        extras = self.model_extra or {}
        unknown = sorted(set(extras) - known)
        if unknown:
            raise ValueError(f"not generate() settings: {', '.join(unknown)}")
        if extras.get("num_return_sequences", 1) != 1 or extras.get("return_dict_in_generate"):
            raise ValueError("num_return_sequences must be 1 and return_dict_in_generate unset: PPO samples one "
                             "response per prompt (repeat prompts, or raise num_rollouts, for more)")
        return self


class MethodConfig(_Section):
    """PPO hyper-parameters; defaults are trlX's `ppo_sentiments` ones."""

    name: Literal["ppoconfig", "ppo"] = "ppoconfig"
    num_rollouts: int = Field(128, ge=1, description="Rollouts collected per iteration.")
    chunk_size: int = Field(128, ge=1, description="Prompts per generate call while collecting rollouts.")
    ppo_epochs: int = Field(4, ge=1)
    init_kl_coef: float = Field(0.001, ge=0)
    target: float | None = Field(None, gt=0, description="Adaptive KL target; None keeps the coefficient fixed.")
    horizon: int = Field(10000, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(1.0, ge=0)
    scale_reward: str | bool | None = Field(None, description="`running` or `ref` divide the clipped scores by "
                                            "their running or reference std; any other value (trlX writes "
                                            "`ignored`, or false) scales nothing.")
    ref_mean: float | None = Field(None, description="Reference score mean (trlX keeps it, nothing uses it); None: "
                                   "the first batch's.")
    ref_std: float | None = Field(None, gt=0, description="Reference score std for scale_reward `ref`; None: the "
                                  "first batch's (clipped) scores' std.")
    cliprange_reward: float = Field(10.0, ge=0, description="Clip scores to +-this before scaling; 0 turns it off.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm; None (trlX) never clips.")
    gen_kwargs: GenKwargs = Field(default_factory=GenKwargs, description="Sampling for evaluation, and for rollouts "
                                  "unless gen_experience_kwargs is set.")
    gen_experience_kwargs: GenKwargs | None = Field(None, description="Sampling for rollouts (trlX).")
    num_value_layers_unfrozen: int = Field(0, ge=0, le=0, description="trlX's value branch: only 0 (a value head "
                                           "on the policy's last hidden state) is supported.")

    @property
    def rollout_kwargs(self) -> GenKwargs:
        return self.gen_experience_kwargs or self.gen_kwargs

    @property
    def scaling(self) -> str | None:
        return self.scale_reward if self.scale_reward in ("running", "ref") else None


class RewardConfig(_Section):
    url: str = Field("http://127.0.0.1:8000", description="Reward service base URL; several replicas: a list or "
                     "comma-separated URLs (kept as one comma-separated string), or a host name with several "
                     "addresses (docker compose --scale reward=N). Chunks are spread over them, failed ones retried "
                     "on the others.")
    model: str | None = Field(None, description="Reward service model name; its default when None.")
    label: str | None = Field(None, description="Score this label (by name), e.g. NEGATIVE; None: the model's "
                              "configured reward label.")
    api_key: str | None = Field(None, exclude=True, description="Bearer key of the reward service; default: the "
                                "REWARD_API_KEY environment variable. Never written to checkpoints.")
    timeout_s: float = Field(60.0, gt=0, description="Per request.")
    max_retries: int | None = Field(None, ge=0, description="Most retries per request (backoff with jitter); "
                                    "None: as many as retry_deadline_s allows.")
    retry_deadline_s: float = Field(600.0, gt=0, description="Most time one scoring call may take, retries "
                                    "included; then the run fails instead of hanging on a dead service.")
    chunk_size: int = Field(256, ge=1, description="Texts per request.")
    wait_ready_s: float = Field(600.0, ge=0, description="How long to wait for the service at start.")

    @model_validator(mode="before")
    @classmethod
    def _url_list(cls, data: Any) -> Any:
        url = data.get("url") if isinstance(data, dict) else None
        if isinstance(url, (list, tuple)) or (isinstance(url, str) and "," in url):
            urls = [u.strip().rstrip("/") for u in (url.split(",") if isinstance(url, str) else map(str, url))]
            if not urls or not all(urls):
                raise ValueError(f"reward.url: an empty URL in {url!r}")
            data = {**data, "url": ",".join(urls)}
        return data

    @model_validator(mode="after")
    def _key_from_env(self) -> RewardConfig:
        self.api_key = key_or_env(self.api_key, "REWARD_API_KEY")
        return self


class DataConfig(_Section):
    source: str = Field("tiny", description="`imdb` or `hf:<dataset id>` (hub), `tiny` (the tiny kit's corpus) or "
                        "a file/folder (CSV, JSONL, Parquet) with a text column.")
    text_column: str = Field("text")
    split: str = Field("train", description="Split for training prompts (imdb).")
    eval_split: str = Field("test", description="Split for eval prompts (imdb); files use held-out rows.")
    prompt_words: tuple[int, int] = Field((3, 5), description="Prompts are the first k words, k in this range.")
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many training prompts.")
    eval_prompts: int = Field(64, ge=1, description="Eval prompts (a fixed set).")

    @model_validator(mode="after")
    def _range(self) -> DataConfig:
        lo, hi = self.prompt_words
        if not 1 <= lo <= hi:
            raise ValueError("data.prompt_words must be [low, high] with 1 <= low <= high")
        return self


class GeneratorConfig(_Section):
    url: str | None = Field(None, description="Generator service URL (it serves checkpoint_dir): when set, the run "
                            "ends with report.md and report.png, base vs trained completions through it.")
    api_key: str | None = Field(None, exclude=True, description="Bearer key of the generator service; default: the "
                                "GENERATOR_API_KEY environment variable. Never written to checkpoints.")

    @model_validator(mode="after")
    def _key_from_env(self) -> GeneratorConfig:
        self.api_key = key_or_env(self.api_key, "GENERATOR_API_KEY")
        return self


class TrainerConfig(_Section):
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    _translation: Any = PrivateAttr(None)  # trlx_format.Translation when read from a trlX config

    @property
    def translation(self):
        """What translating a trlX config did (said at the start of a run), or None for this project's format."""
        return self._translation

    @model_validator(mode="after")
    def _consistent(self) -> TrainerConfig:
        if self.method.num_rollouts % self.train.batch_size:
            raise ValueError(f"method.num_rollouts ({self.method.num_rollouts}) must be a multiple of "
                             f"train.batch_size ({self.train.batch_size})")
        return self

    @property
    def run_dir(self) -> Path:
        return self.train.checkpoint_dir / self.train.run_name

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """trlX's unit: one optimizer step per minibatch, `ppo_epochs` passes over `num_rollouts` rollouts."""
        return self.method.ppo_epochs * self.method.num_rollouts // self.train.batch_size

    def evaluates_after(self, iteration: int) -> bool:
        return reaches_multiple(iteration, self.train.eval_interval) or iteration == self.train.total_steps

    def checkpoints_after(self, iteration: int) -> bool:
        return reaches_multiple(iteration, self.train.checkpoint_interval) or iteration == self.train.total_steps


def reaches_multiple(iteration: int, interval: float) -> bool:
    """Whether iteration `iteration` (1-based) reaches a multiple of `interval` iterations, which may be a fraction
    (100 of trlX's optimizer steps at 16 a iteration is 6.25): exact, with the fraction read as the nearest ratio of
    small integers so that 100/3 stays 100/3."""
    step = Fraction(interval).limit_denominator(1_000_000)
    return iteration // step > (iteration - 1) // step


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars: 3 -> int, 1e-4 -> float, true -> bool, [3, 5] -> list, else a string."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def expand_env(data: Any) -> Any:
    """`${VAR:-default}` in string values, so one config serves the compose file and local runs."""
    if isinstance(data, dict):
        return {k: expand_env(v) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v) for v in data]
    if isinstance(data, str) and "${" in data:
        import re

        # As the shell's ${VAR:-default}: an empty variable counts as unset.
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: os.environ.get(m.group(1)) or m.group(2) or "", data)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict | None = None) -> TrainerConfig:
    """Config from a YAML file (or `base`), with `key=value` overrides applied last. A trlX config file (or dict) is
    translated (services/trainer/trlx_format.py), its overrides in trlX's units; `config.translation` then says what
    it did."""
    from services.trainer.trlx_format import is_trlx_config, translate

    data = apply_overrides(expand_env(read_yaml(path)) if path else copy.deepcopy(base or {}), overrides or [])
    if not is_trlx_config(data):
        return TrainerConfig(**data)
    translation = translate(data, path)
    config = TrainerConfig(**translation.config)
    config._translation = translation
    return config
