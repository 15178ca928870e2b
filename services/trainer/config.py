"""The training job's configuration: trlX-like sections (train, model, tokenizer, optimizer, scheduler, method) plus
reward, data and generator. YAML in, validated at start, overridable with `--set section.key=value`."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from shared.runtime import available_cores
from shared.settings import read_yaml

if TYPE_CHECKING:
    import torch

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


def run_flag_overrides(fresh: bool = False, run_name: str | None = None) -> list[str]:
    """What `--fresh` and `--run-name` (rlhf train, trainer serve, up) mean, as overrides validated with the rest."""
    return [*(["train.resume=false"] if fresh else []), *([f"train.run_name={run_name}"] if run_name else [])]


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
    tracker: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers besides metrics.jsonl (always "
        "written): tensorboard, wandb, mlflow, aim; several as a list or comma-separated; none (or null, empty) for "
        "none. The default, tensorboard, is skipped with a warning where it is not installed; a tracker named here "
        "that is not installed fails at load (pip install 'rlhf-services[tracking]'). `tensorboard: false`, the "
        "older switch, still turns TensorBoard off.")
    logging_dir: Path | None = Field(None, description="Where trackers write (tensorboard/, wandb/, mlflow/, aim/); "
                                     "default: the run folder. A folder shared by runs collects them all.")
    project_name: str = Field("rlhf", min_length=1, description="W&B project, MLflow experiment, Aim experiment.")
    entity_name: str | None = Field(None, description="W&B entity (team or user); None: the account's default.")
    group_name: str | None = Field(None, description="W&B run group (MLflow: the tag `group`).")
    tags: list[str] = Field(default_factory=list, description="W&B and Aim run tags (MLflow: the tag `tags`).")
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

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_switch(cls, data: Any) -> Any:
        """`tensorboard: true|false`, the switch `tracker` replaced: false takes TensorBoard out of the trackers."""
        if not isinstance(data, dict) or "tensorboard" not in data:
            return data
        from pydantic import TypeAdapter

        from services.trainer.trackers import parse_names

        data = dict(data)
        on = TypeAdapter(bool).validate_python(data.pop("tensorboard"))
        if on and "tracker" not in data:
            return data  # the default: TensorBoard where installed
        names = [n for n in parse_names(data.get("tracker", ["tensorboard"])) if n != "tensorboard"]
        data["tracker"] = (["tensorboard"] if on else []) + names
        return data

    @field_validator("tracker", mode="before")
    @classmethod
    def _tracker_names(cls, value: Any) -> list[str]:
        from services.trainer.trackers import parse_names

        return parse_names(value)

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _trackers_installed(self, info: ValidationInfo) -> TrainConfig:
        """A tracker asked for by name fails here, not when the run starts; the default is skipped at the start."""
        from services.trainer import trackers

        if "tracker" in self.model_fields_set and not (info.context or {}).get(trackers.SKIP_PACKAGE_CHECK):
            missing = trackers.missing_trackers(list(self.tracker))
            if missing:
                raise ValueError(f"train.tracker: {', '.join(missing)} not installed: {trackers.INSTALL_HINT}")
        return self


class ModelConfig(_Section):
    """The policy being trained; its KL reference is a frozen copy of it."""

    model_path: str = Field(description="Policy to fine-tune: a local folder or a hub id.")
    revision: str | None = Field(None, description="Hub revision of model_path (branch, tag or commit); None: the "
                                 "default branch.")
    value_head_hidden: int | None = Field(None, description="Hidden width of the value head, in units; None (or 0): "
                                          "2 x the model's hidden size (as trlX).")
    num_layers_unfrozen: int = Field(-1, ge=-1, description="Train only the top N blocks (embeddings and lower blocks "
                                     "frozen) with a hydra reference sharing the frozen trunk; -1: every parameter "
                                     "trains, against a full frozen copy (trlX's semantics).")


class TokenizerConfig(_Section):
    tokenizer_path: str | None = Field(None, description="Tokenizer folder or hub id; None: model.model_path.")
    truncation_side: Literal["left", "right"] = Field("right", description="Which end of a prompt is cut when it is "
                                                      "longer than seq_length - max_new_tokens tokens.")


# -- optimizer and scheduler settings: trlX passes `kwargs` to the torch class as they are, so each setting a config
# leaves out takes torch's default (None here); a config with no optimizer kwargs at all gets trlX's
# default_ppo_config() ones, those the optimizer takes.
DEFAULT_OPTIMIZER_KWARGS: dict[str, Any] = {"lr": 3e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 1e-6}
Beta = Annotated[float, Field(ge=0, lt=1)]


class TorchOptimizerKwargs(_Section):
    """What every optimizer here takes; None: torch's default."""

    lr: float | None = Field(None, ge=0, description="Learning rate (step size per optimizer step) before the "
                             "scheduler's factor; None: torch's 1e-3.")
    weight_decay: float | None = Field(None, ge=0, description="Weight decay per optimizer step (adamw: decoupled, "
                                       "scaled by lr; adam and sgd: an L2 term added to the gradient); None: torch's "
                                       "(adamw 0.01, adam and sgd 0).")
    fused: bool | None = Field(None, description="One fused kernel per step for all parameters; None: on for adam and "
                               "adamw unless foreach is set, else torch's choice.")
    foreach: bool | None = Field(None, description="Batch the update across parameters with torch's foreach ops; "
                                 "None: torch's choice.")


class AdamKwargs(TorchOptimizerKwargs):
    """torch.optim.Adam and AdamW."""

    betas: tuple[Beta, Beta] | None = Field(None, description="Decay per optimizer step of the running means of the "
                                            "gradient and of its square, each in [0, 1); None: torch's (0.9, 0.999).")
    eps: float | None = Field(None, ge=0, description="Added to the root of the squared-gradient mean, for numerical "
                              "stability; None: torch's 1e-8.")


class SGDKwargs(TorchOptimizerKwargs):
    """torch.optim.SGD."""

    momentum: float | None = Field(None, ge=0, description="Fraction of the previous update carried into each step; "
                                   "None: torch's 0.")
    nesterov: bool | None = Field(None, description="Nesterov momentum (needs momentum > 0); None: torch's false.")


OPTIMIZER_KWARGS: dict[str, type[TorchOptimizerKwargs]] = {"adamw": AdamKwargs, "adam": AdamKwargs, "sgd": SGDKwargs}
TORCH_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}  # torch.optim's class names


class CosineAnnealingKwargs(_Section):
    """torch's CosineAnnealingLR: the rate follows half a cosine from optimizer.kwargs.lr down to eta_min."""

    T_max: int | None = Field(None, ge=1, description="Optimizer steps from the full rate down to eta_min (the rate "
                              "then rises again); None: the whole run.")
    eta_min: float = Field(0.0, ge=0, description="Lowest learning rate, reached after T_max optimizer steps.")

    def torch_kwargs(self, total_steps: int) -> dict[str, Any]:
        return {"T_max": total_steps if self.T_max is None else self.T_max, "eta_min": self.eta_min}


class LinearKwargs(_Section):
    """torch's LinearLR: the rate is optimizer.kwargs.lr times a factor going linearly from start to end."""

    start_factor: float = Field(1.0, gt=0, le=1, description="Factor on the learning rate at the first optimizer "
                                "step.")
    end_factor: float = Field(0.0, ge=0, le=1, description="Factor reached after total_iters optimizer steps, and "
                              "kept after.")
    total_iters: int | None = Field(None, ge=1, description="Optimizer steps from start_factor to end_factor; None: "
                                    "the whole run.")

    def torch_kwargs(self, total_steps: int) -> dict[str, Any]:
        return {"start_factor": self.start_factor, "end_factor": self.end_factor,
                "total_iters": total_steps if self.total_iters is None else self.total_iters}


class ConstantKwargs(_Section):
    """No settings: the learning rate stays optimizer.kwargs.lr."""

    def torch_kwargs(self, total_steps: int) -> dict[str, Any]:
        return {}


SCHEDULER_KWARGS: dict[str, type[CosineAnnealingKwargs | LinearKwargs | ConstantKwargs]] = {
    "cosine_annealing": CosineAnnealingKwargs, "linear": LinearKwargs, "constant": ConstantKwargs}


def kwargs_for_name(section: str, value: Any, info: ValidationInfo, classes: Mapping[str, type[_Section]]) -> Any:
    """`value` validated as the kwargs of the section's `name` (validated before it), a key that this name does not
    take refused by name."""
    expected = classes.get(info.data.get("name", ""))
    if expected is None:  # the name is wrong, and its own error says so: the kwargs cannot be judged
        return next(iter(classes.values())).model_construct()
    if isinstance(value, expected):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_unset=True)
    if isinstance(value, dict):
        wrong = [key for key in value if key not in expected.model_fields]
        if wrong:
            takes = ", ".join(expected.model_fields) or "none"
            raise ValueError(f"{section}.kwargs do not fit {info.data['name']}: {', '.join(map(str, wrong))} "
                             f"{'is' if len(wrong) == 1 else 'are'} not among its settings (it takes {takes})")
    return expected.model_validate(value)


class OptimizerConfig(_Section):
    """torch's optimizer of that name, given the settings in `kwargs` (as trlX does)."""

    name: Literal["adamw", "adam", "sgd"] = Field("adamw", description="torch.optim.AdamW, Adam or SGD.")
    kwargs: AdamKwargs | SGDKwargs = Field(
        default_factory=lambda: AdamKwargs(**DEFAULT_OPTIMIZER_KWARGS), validate_default=True,
        description=f"The optimizer's settings; left out: {DEFAULT_OPTIMIZER_KWARGS} (trlX's defaults), those the "
        "optimizer takes.")

    @model_validator(mode="before")
    @classmethod
    def _default_kwargs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kwargs" not in data and data.get("name", "adamw") in OPTIMIZER_KWARGS:
            takes = OPTIMIZER_KWARGS[data.get("name", "adamw")].model_fields
            data = {**data, "kwargs": {k: v for k, v in DEFAULT_OPTIMIZER_KWARGS.items() if k in takes}}
        return data

    @field_validator("kwargs", mode="before")
    @classmethod
    def _kwargs_of_name(cls, value: Any, info: ValidationInfo) -> Any:
        return kwargs_for_name("optimizer", value, info, OPTIMIZER_KWARGS)

    @model_validator(mode="after")
    def _torch_takes_them(self) -> OptimizerConfig:
        """What the types cannot say (nesterov without momentum, say) torch says, at load."""
        import torch

        try:
            self.build([torch.nn.Parameter(torch.zeros(1))])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"optimizer.kwargs do not fit torch's {self.name}: {exc}") from None
        return self

    def torch_kwargs(self) -> dict[str, Any]:
        """The settings given, those left out omitted so that torch's defaults apply: what trlX passes torch."""
        return self.kwargs.model_dump(exclude_none=True)

    def build(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        import torch

        kwargs = self.torch_kwargs()
        if self.name in ("adam", "adamw") and self.kwargs.fused is None and self.kwargs.foreach is None:
            # The same update in one kernel instead of ~10 ops per tensor: on 2 CPU cores AdamW's step on GPT-2
            # small took 0.2 s unfused, 0.03 s fused. `fused: false` in kwargs turns it off.
            kwargs["fused"] = True
        optimizer_class: type[torch.optim.Optimizer] = getattr(torch.optim, TORCH_OPTIMIZERS[self.name])
        return optimizer_class(params, **kwargs)


class SchedulerConfig(_Section):
    """Stepped after every optimizer step (as trlX), so `kwargs` count optimizer steps; the whole run is
    train.total_steps x the optimizer steps of an iteration."""

    name: Literal["cosine_annealing", "linear", "constant"] = Field(
        "constant", description="`cosine_annealing`: torch's CosineAnnealingLR; `linear`: torch's LinearLR (default: "
        "from the full rate down to 0 over the run); `constant`: no schedule.")
    kwargs: CosineAnnealingKwargs | LinearKwargs | ConstantKwargs = Field(
        default_factory=ConstantKwargs, validate_default=True, description="The schedule's settings (each has a "
        "default).")

    @field_validator("kwargs", mode="before")
    @classmethod
    def _kwargs_of_name(cls, value: Any, info: ValidationInfo) -> Any:
        return kwargs_for_name("scheduler", value, info, SCHEDULER_KWARGS)

    def torch_kwargs(self, total_steps: int) -> dict[str, Any]:
        """The torch scheduler's kwargs, defaults filled in, for a run of `total_steps` optimizer steps."""
        return self.kwargs.torch_kwargs(total_steps)

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        from torch.optim import lr_scheduler

        if self.name == "cosine_annealing":
            return lr_scheduler.CosineAnnealingLR(optimizer, **self.torch_kwargs(total_steps))
        if self.name == "linear":
            return lr_scheduler.LinearLR(optimizer, **self.torch_kwargs(total_steps))
        return lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class GenKwargs(BaseModel):
    """Keyword arguments of `generate`: the ones below are checked, others (as trlX allows) pass through."""

    model_config = ConfigDict(extra="allow")
    max_new_tokens: int = Field(40, ge=1, description="Longest response, in tokens; prompts are cut to seq_length "
                                "minus this.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens only; 0: no top-k filter.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sample among the fewest most likely tokens whose probabilities "
                         "sum to this (nucleus); 1: no filter.")
    do_sample: bool = Field(True, description="Sample; false: greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Divides the logits before sampling: below 1 sharper, above 1 "
                               "flatter.")

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

    name: Literal["ppoconfig", "ppo"] = Field("ppoconfig", description="trlX's method name (PPOConfig, any case): "
                                              "PPO is the only method.")
    num_rollouts: int = Field(128, ge=1, description="Rollouts (prompt + sampled response) collected per iteration.")
    chunk_size: int = Field(128, ge=1, description="Prompts per generate call while collecting rollouts.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over an iteration's rollouts, each of num_rollouts / "
                            "train.batch_size optimizer steps.")
    init_kl_coef: float = Field(0.001, ge=0, description="Starting weight of the per-token KL penalty against the "
                                "reference, in reward per nat.")
    target: float | None = Field(None, gt=0, description="Adaptive KL target, in nats per response; None keeps the "
                                 "coefficient fixed.")
    horizon: int = Field(10000, ge=1, description="Adaptive KL horizon, in rollouts: each of an iteration's ppo_epochs "
                         "updates moves the coefficient by at most 20% x train.batch_size / horizon.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per response token (GAE).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 0 one-step TD advantages, 1 Monte Carlo returns.")
    cliprange: float = Field(0.2, gt=0, description="Policy clip: the probability ratio new/old is kept within 1 "
                             "+- this.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip: new value predictions stay within +- this of "
                                   "the rollout's, in reward units.")
    vf_coef: float = Field(1.0, ge=0, description="Weight of the value loss beside the policy loss.")
    scale_reward: str | bool | None = Field(None, description="`running` or `ref` divide the clipped scores by "
                                            "their running or reference std; any other value (trlX writes "
                                            "`ignored`, or false) scales nothing.")
    ref_mean: float | None = Field(None, description="Reference score mean (trlX keeps it, nothing uses it); None: "
                                   "the first batch's.")
    ref_std: float | None = Field(None, gt=0, description="Reference score std for scale_reward `ref`; None: the "
                                  "first batch's (clipped) scores' std.")
    cliprange_reward: float = Field(10.0, ge=0, description="Clip scores to +-this (reward units) before scaling; 0 "
                                    "turns it off.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient's global L2 norm to this; None "
                                        "(trlX) never clips.")
    gen_kwargs: GenKwargs = Field(default_factory=GenKwargs, description="Sampling for evaluation, and for rollouts "
                                  "unless gen_experience_kwargs is set.")
    gen_experience_kwargs: GenKwargs | None = Field(None, description="Sampling for rollouts (trlX).")
    num_value_layers_unfrozen: int = Field(0, ge=0, le=0, description="trlX's value branch: only 0 (a value head "
                                           "on the policy's last hidden state) is supported.")

    @property
    def rollout_kwargs(self) -> GenKwargs:
        """Sampling for rollouts: gen_experience_kwargs when set, else gen_kwargs."""
        return self.gen_experience_kwargs or self.gen_kwargs

    @property
    def scaling(self) -> str | None:
        """`running`, `ref`, or None for no reward scaling."""
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

    @property
    def total_optimizer_steps(self) -> int:
        """The whole run in optimizer steps: what learning-rate schedules count."""
        return self.train.total_steps * self.optimizer_steps_per_iteration

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
