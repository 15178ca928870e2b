"""The training job's configuration: trlX-like sections (train, model, tokenizer, optimizer, scheduler, method) plus
reward, data and generator. YAML in, validated at start, overridable with `--set section.key=value`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    total_steps: int = Field(100, ge=1, description="PPO iterations (rollout + update), not optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Rollouts per minibatch of the PPO update.")
    seq_length: int = Field(1024, ge=8, description="Longest prompt + response, in tokens.")
    eval_interval: int = Field(10, ge=1, description="Evaluate every this many iterations (and at the end).")
    checkpoint_interval: int = Field(10, ge=1, description="Checkpoint every this many iterations (and at the end).")
    checkpoint_dir: Path = Field(Path("runs"), description="Root of `<run>/step-<N>/` checkpoints.")
    run_name: str = Field("ppo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="Run folder name.")
    seed: int = Field(1000, description="Seeds data order, sampling and the value head.")
    resume: bool = Field(True, description="Continue from the run's last checkpoint when there is one.")
    keep_checkpoints: int = Field(0, ge=0, description="Keep only the newest N (0 keeps all; `best` always kept).")
    eval_samples_per_prompt: int = Field(2, ge=1, description="Samples averaged per eval prompt (less noise).")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads.")
    tensorboard: bool = Field(True, description="Also log to TensorBoard when it is installed.")


class ModelConfig(_Section):
    model_path: str = Field(description="Policy to fine-tune: a local folder or a hub id.")
    revision: str | None = None
    value_head_hidden: int | None = Field(None, description="Value head width; default 2 x hidden (as trlX).")


class TokenizerConfig(_Section):
    tokenizer_path: str | None = Field(None, description="Default: model.model_path.")
    truncation_side: Literal["left", "right"] = "right"


class OptimizerConfig(_Section):
    name: Literal["adamw"] = "adamw"
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"lr": 3e-5, "betas": (0.9, 0.95), "eps": 1e-8,
                                                            "weight_decay": 1e-6})


class SchedulerConfig(_Section):
    name: Literal["cosine_annealing", "linear", "constant"] = "constant"
    kwargs: dict[str, Any] = Field(default_factory=dict, description="cosine: T_max, eta_min (in iterations).")


class GenKwargs(_Section):
    max_new_tokens: int = Field(40, ge=1)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    do_sample: bool = True
    temperature: float = Field(1.0, gt=0)


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
    scale_reward: Literal["running", "ref"] | None = None
    cliprange_reward: float = Field(10.0, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    gen_kwargs: GenKwargs = Field(default_factory=GenKwargs)


class RewardConfig(_Section):
    url: str = Field("http://127.0.0.1:8000", description="Reward service base URL.")
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

    @model_validator(mode="after")
    def _consistent(self) -> TrainerConfig:
        if self.method.num_rollouts % self.train.batch_size:
            raise ValueError(f"method.num_rollouts ({self.method.num_rollouts}) must be a multiple of "
                             f"train.batch_size ({self.train.batch_size})")
        return self

    @property
    def run_dir(self) -> Path:
        return self.train.checkpoint_dir / self.train.run_name


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
    """Config from a YAML file (or `base`), with `key=value` overrides applied last."""
    data = expand_env(read_yaml(path)) if path else dict(base or {})
    return TrainerConfig(**apply_overrides(data, overrides or []))
