"""`train.engine: trlx`: CarperAI/trlX itself runs the PPO job, in its own Python environment.

trlX needs transformers <= 4.51.3 and accelerate 0.24.1 while this project runs on transformers 5, so trlX cannot
be imported here. This module (project environment) translates the project config into trlX's (`trlx_config`),
checks that the trlX environment and the config are ones trlX runs correctly with (`check_engine_environment`,
`check_trlx_config`), prepares the model and tokenizer in a form transformers 4.51 reads, and runs
`services/trainer/trlx_runner.py` in the trlX environment (`run_trlx`), following its progress on a pipe and
forwarding a stop to it. The runner writes metrics.jsonl and checkpoints in the project's layout itself.

Nothing here imports trlX, and only `run_trlx` imports transformers (lazily).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.trainer.config import TrainerConfig, stop_grace_s
from services.trainer.tracking import TrainingStatus
from services.trainer.trlx_format import TrlxConfigError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TRLX_REF = "3340c2f3a56d1d14fdd5f13ad575121fa26b6d92"  # the commit these adapters were written and checked against
PYTHON_ENV = "RLHF_TRLX_PYTHON"
DEFAULT_ENV_DIR = Path(".cache") / "trlx-env"
TRAINER_NAME = "RLHFProjectPPOTrainer"  # the runner's AcceleratePPOTrainer subclass, as registered with trlX
MAX_TRANSFORMERS = (4, 51, 3)  # newer: trlX's hydra reference or its generate calls break
ACCELERATE_BELOW = (0, 25)  # 0.25+: trlX's checkpoint save fails on tied weights
WORK_DIR = ".trlx"  # inside the run folder: hidden, so no checkpoint scan ever reads it
MAKE_HINT = "make trlx-env TRLX_SRC=<trlX git URL or local checkout>"
EVENTS_FD_ENV = "RLHF_TRLX_EVENTS_FD"


class TrlxEngineError(RuntimeError):
    """The trlX environment is missing or wrong, or the runner failed; the message says what to do."""


# -- where the trlX environment is ------------------------------------------------------------------------------------


def trlx_python() -> Path:
    """`RLHF_TRLX_PYTHON`, else `.cache/trlx-env/bin/python` under the repository root."""
    value = os.environ.get(PYTHON_ENV)
    return Path(value) if value else ROOT / DEFAULT_ENV_DIR / "bin" / "python"


# -- the config mapping (pure) ----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON's types: tuples (betas) become lists, as trlX's YAML configs have them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def optimizer_config(config: TrainerConfig) -> dict[str, Any]:
    """The same torch optimizer with the same settings: both engines pass the kwargs given, torch's defaults for the
    rest."""
    return {"name": config.optimizer.name, "kwargs": _plain(config.optimizer.torch_kwargs())}


def scheduler_config(config: TrainerConfig) -> dict[str, Any]:
    """The project scheduler in trlX's terms. Both engines step it after every optimizer step and read its kwargs in
    optimizer steps; the project's defaults (the whole run: iterations x optimizer steps per iteration) are written
    out, since trlX has none. trlX has `cosine_annealing` (CosineAnnealingLR) and `linear` (LinearLR) only: the
    project's `constant` is LinearLR with both factors 1."""
    s, total = config.scheduler, config.total_optimizer_steps
    if s.name == "constant":
        return {"name": "linear", "kwargs": {"start_factor": 1.0, "end_factor": 1.0, "total_iters": total}}
    return {"name": s.name, "kwargs": _plain(s.torch_kwargs(total))}


def _gen_kwargs(kwargs) -> dict[str, Any] | None:
    return None if kwargs is None else kwargs.model_dump(mode="json")


def trlx_config(config: TrainerConfig, model_dir: str | Path, tokenizer_dir: str | Path,
                checkpoint_tmp: str | Path) -> dict[str, Any]:
    """The trlX `TRLConfig.to_dict()` for `config`: every field of every section, so `TRLConfig.from_dict` takes
    it as it is. Units: the project counts PPO iterations, trlX optimizer steps (`total_steps` = iterations x
    ppo_epochs x num_rollouts / batch_size; `epochs` = rollout collections = iterations). trlX's own evaluation
    and checkpoints are pushed past the end (the runner's trainer evaluates and checkpoints at the project's points,
    and turns off the saves trlX still makes at its last step); no tracker."""
    t, m = config.train, config.method
    steps = config.total_optimizer_steps
    return {
        "method": {
            "name": "PPOConfig",
            "ppo_epochs": m.ppo_epochs,
            "num_rollouts": m.num_rollouts,
            "chunk_size": m.chunk_size,
            "init_kl_coef": m.init_kl_coef,
            "target": m.target,
            "horizon": m.horizon,
            "gamma": m.gamma,
            "lam": m.lam,
            "cliprange": m.cliprange,
            "cliprange_value": m.cliprange_value,
            "vf_coef": m.vf_coef,
            "scale_reward": m.scaling,
            "ref_mean": m.ref_mean,
            "ref_std": m.ref_std,
            "cliprange_reward": m.cliprange_reward,
            "gen_kwargs": _gen_kwargs(m.gen_kwargs),
            "gen_experience_kwargs": _gen_kwargs(m.gen_experience_kwargs),
            "num_value_layers_unfrozen": m.num_value_layers_unfrozen,
        },
        "model": {
            "model_path": str(model_dir),
            "model_arch_type": "causal",
            "num_layers_unfrozen": config.model.num_layers_unfrozen,
            "peft_config": None,
            # transformers 4.46-4.51 default to sdpa, under which trlX's hydra branch (it passes a padding mask
            # only) attends to future tokens: the reference, and so the KL, is silently wrong. Eager is right.
            "model_extra_configs": {"attn_implementation": "eager"},
        },
        "optimizer": optimizer_config(config),
        "scheduler": scheduler_config(config),
        "tokenizer": {
            "tokenizer_path": str(tokenizer_dir),
            "padding_side": "left",
            "truncation_side": config.tokenizer.truncation_side,
            "tokenizer_extra_configs": {},
        },
        "train": {
            "total_steps": steps,
            "seq_length": t.seq_length,
            "epochs": t.total_steps,
            "batch_size": t.batch_size,
            "checkpoint_interval": steps + 1,
            "eval_interval": steps + 1,
            "pipeline": "PromptPipeline",
            "trainer": TRAINER_NAME,
            "trainer_kwargs": {},
            "project_name": "rlhf-services",
            "run_name": t.run_name,
            "entity_name": None,
            "group_name": None,
            "checkpoint_dir": str(checkpoint_tmp),
            "rollout_logging_dir": None,
            "save_best": False,
            "save_optimizer": False,
            "resume_from_checkpoint": None,
            "tracker": None,
            "logging_dir": None,
            "tags": [],
            "seed": t.seed,
            "minibatch_size": None,
        },
    }


# -- what trlX cannot honour ------------------------------------------------------------------------------------------


def check_trlx_config(config: TrainerConfig, reward_fn: Callable | None = None,
                      model_config: dict | None = None) -> None:
    """TrlxConfigError for a config trlX would not run as the project means it (or would run wrongly here);
    `model_config` (the policy's config.json) adds the checks that need the model."""
    m, layers = config.method, config.model.num_layers_unfrozen
    problems: list[str] = []
    if layers == -1:
        problems.append("model.num_layers_unfrozen is -1 (every parameter trains): trlX then builds a separate "
                        "reference model that, on the stack it runs on here, does not reproduce the starting policy "
                        "(the KL is wrong from the first step). Set it to the number of top blocks to train, "
                        "1..n_layer (n_layer trains every block; embeddings and the tied LM head stay frozen)")
    elif layers == 0:
        problems.append("model.num_layers_unfrozen is 0: only the value head would train, against the same "
                        "separate reference as -1 (wrong here). Set it to 1..n_layer")
    if reward_fn is not None:
        problems.append("a Python reward_fn was given: the trlX engine runs in its own process and scores through "
                        "the reward service (config.reward.url) exactly as the native engine does by default; serve "
                        "the reward model there, or use train.engine=native")
    if m.max_grad_norm is not None:
        problems.append(f"method.max_grad_norm is {m.max_grad_norm}: trlX has no gradient clipping (no such "
                        "setting); set it to null to train with trlX, or use train.engine=native")
    if config.train.mixed_precision in ("bf16", "fp16"):
        problems.append(f"train.mixed_precision is {config.train.mixed_precision}: the trlX engine trains in "
                        "float32 (trlX takes mixed precision from its own accelerate config); set it to auto or no, "
                        "or use train.engine=native")
    if m.num_rollouts % m.chunk_size:
        problems.append(f"method.num_rollouts ({m.num_rollouts}) is not a multiple of method.chunk_size "
                        f"({m.chunk_size}): trlX collects whole chunks until it has num_rollouts, so it would train "
                        f"on {math.ceil(m.num_rollouts / m.chunk_size) * m.chunk_size} rollouts an iteration")
    if m.scaling == "ref" and m.ref_mean is not None and m.ref_std is None:
        problems.append("method.scale_reward is `ref` with ref_mean set and ref_std unset: trlX takes ref_std from "
                        "the first batch only when ref_mean is unset too (it would divide by None); set ref_std")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("the job was launched with several processes: the trlX engine runs one process")
    if model_config is not None:
        n_layer = _num_layers(model_config)
        if n_layer is not None and layers > n_layer:
            problems.append(f"model.num_layers_unfrozen is {layers} but the policy has {n_layer} blocks")
        width = _hidden_size(model_config)
        head = config.model.value_head_hidden
        if head is not None and width is not None and head != 2 * width:
            problems.append(f"model.value_head_hidden is {head}: trlX's value head is always 2 x hidden "
                            f"({2 * width}); unset it")
    if problems:
        raise TrlxConfigError("train.engine=trlx cannot run this config: " + "; ".join(problems))


def _num_layers(model_config: dict) -> int | None:
    for key in ("n_layer", "num_hidden_layers", "num_layers"):
        if isinstance(model_config.get(key), int):
            return model_config[key]
    return None


def _hidden_size(model_config: dict) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(model_config.get(key), int):
            return model_config[key]
    return None


# -- the environment check --------------------------------------------------------------------------------------------

_PROBE = """
import importlib.metadata as md, json, sys
out = {"python": sys.version.split()[0]}
for name in ("trlx", "transformers", "accelerate", "deepspeed", "torch", "httpx", "pydantic", "pydantic-settings",
             "pyyaml", "torchtyping", "ray"):
    try:
        out[name] = md.version(name)
    except md.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


def _version(text: str | None) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text or "")
    return tuple(int(g or 0) for g in match.groups()) if match else None


def engine_versions(python: str | Path | None = None) -> dict[str, str | None]:
    """The package versions of the trlX environment (one run of its python); TrlxEngineError when it cannot run."""
    python = Path(python) if python else trlx_python()
    if not python.exists():
        where = f"{PYTHON_ENV}={python}" if os.environ.get(PYTHON_ENV) else str(python)
        raise TrlxEngineError(f"train.engine=trlx: no trlX environment ({where} does not exist). Build it with "
                              f"`{MAKE_HINT}` (trlX pinned to {TRLX_REF[:7]}), or point {PYTHON_ENV} at a python "
                              "that has it")
    try:
        done = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise TrlxEngineError(f"train.engine=trlx: cannot run {python} ({exc}); rebuild it with `{MAKE_HINT}`") \
            from None
    except subprocess.TimeoutExpired:
        raise TrlxEngineError(f"train.engine=trlx: {python} did not answer within 120 s") from None
    lines = done.stdout.strip().splitlines()
    try:
        versions = json.loads(lines[-1])
        assert isinstance(versions, dict)
    except (IndexError, ValueError, AssertionError):
        raise TrlxEngineError(f"train.engine=trlx: {python} failed to report its packages (exit {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-500:]}") from None
    return versions


def check_engine_environment(python: str | Path | None = None, config: TrainerConfig | None = None,
                             reward_fn: Callable | None = None) -> None:
    """Raise TrlxEngineError when the trlX environment (`python`, default `trlx_python()`) is missing or is not
    the stack trlX runs correctly on, saying what is wrong and what to run; with `config` (and `reward_fn`), also
    TrlxConfigError for what trlX cannot honour (`check_trlx_config`)."""
    if config is not None:
        check_trlx_config(config, reward_fn)
    python = Path(python) if python else trlx_python()
    v = engine_versions(python)
    problems = []
    if not v.get("trlx"):
        problems.append("trlX is not installed")
    transformers = _version(v.get("transformers"))
    if transformers is None:
        problems.append("transformers is not installed")
    elif transformers > MAX_TRANSFORMERS:
        problems.append(f"transformers is {v['transformers']}, trlX needs <= 4.51.3 (newer ones break its hydra "
                        "reference and generation)")
    accelerate = _version(v.get("accelerate"))
    if accelerate is None:
        problems.append("accelerate is not installed")
    elif accelerate >= ACCELERATE_BELOW:
        problems.append(f"accelerate is {v['accelerate']}, trlX needs 0.24.1 (0.25+ fails to save tied weights)")
    if not v.get("deepspeed"):
        problems.append("deepspeed is not installed (trlX imports it; install it with DS_BUILD_OPS=0)")
    if not v.get("torch"):
        problems.append("torch is not installed")
    missing = [name for name in ("httpx", "pydantic", "pydantic-settings", "pyyaml") if not v.get(name)]
    if missing:
        problems.append(f"the runner needs {', '.join(missing)} from this project's dependencies")
    if problems:
        raise TrlxEngineError(f"train.engine=trlx: the trlX environment at {python} is not usable: "
                              f"{'; '.join(problems)}. Rebuild it with `{MAKE_HINT}`")


# -- running it -------------------------------------------------------------------------------------------------------


def prepare_model(config: TrainerConfig, work: Path) -> dict[str, Any]:
    """Write, under `work`, what the runner needs from the policy, with this project's transformers:
      template/  the policy and tokenizer exactly as a native checkpoint holds them (save_pretrained here): the
                 runner saves trained weights under the same tensor names, with these config and tokenizer files;
      model/     config.json (eager attention) and pytorch_model.bin, the form trlX's loader reads;
      tokenizer/ the tokenizer files with tokenizer_config.json naming PreTrainedTokenizerFast (transformers 4.51
                 does not know this version's class names) and model_input_names input_ids, attention_mask.
    Returns the model's config and a tokenization sample for the runner to check its tokenizer against."""
    import torch

    from services.trainer.policy import load_policy_and_tokenizer

    model, tokenizer = load_policy_and_tokenizer(config.model.model_path, config.model.revision,
                                                 config.tokenizer.tokenizer_path)
    tokenizer.truncation_side = config.tokenizer.truncation_side
    template, model_dir, tokenizer_dir = work / "template", work / "model", work / "tokenizer"
    for folder in (template, model_dir, tokenizer_dir):
        shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(template, safe_serialization=True)
    tokenizer.save_pretrained(template)
    model_dir.mkdir(parents=True)
    model_config = json.loads((template / "config.json").read_text())
    model_config["_attn_implementation"] = "eager"
    (model_dir / "config.json").write_text(json.dumps(model_config, indent=2))
    if (template / "generation_config.json").exists():
        shutil.copy(template / "generation_config.json", model_dir)
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
               model_dir / "pytorch_model.bin")
    shutil.copytree(template, tokenizer_dir, ignore=shutil.ignore_patterns(
        "*.safetensors", "*.bin", "config.json", "generation_config.json", "*.index.json"))
    tokenizer_config_path = tokenizer_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text()) if tokenizer_config_path.exists() else {}
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    for key in ("backend", "is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2))
    return {"model_config": model_config, "template": str(template), "model_dir": str(model_dir),
            "tokenizer_dir": str(tokenizer_dir), "eos_token": tokenizer.eos_token,
            "tokenizer": tokenizer}


def _token_check(tokenizer, texts: Sequence[str], limit: int = 32) -> list[dict]:
    sample = list(dict.fromkeys(texts))[:limit]
    ids = tokenizer(sample, add_special_tokens=False).input_ids
    return [{"text": text, "ids": list(row)} for text, row in zip(sample, ids)]


def _cyclic_multiple(prompts: list[str], chunk: int) -> list[str]:
    """trlX draws `chunk_size` prompts per generate call from a loader whose last batch is short, which would make
    an iteration collect more than num_rollouts: the list is extended cyclically to a multiple of chunk_size."""
    if not prompts:
        raise TrlxConfigError("no training prompts")
    short = -len(prompts) % chunk
    return prompts + [prompts[i % len(prompts)] for i in range(short)]


def _existing_checkpoints(config: TrainerConfig) -> list[str]:
    from shared.checkpoints import scan_checkpoints

    return [c.name for c in scan_checkpoints(config.train.checkpoint_dir) if c.run == config.train.run_name]


def run_trlx(config: TrainerConfig, prompts: Sequence[str] | None, eval_prompts: Sequence[str] | None,
             status: TrainingStatus, on_step: Callable[[dict], None] | None = None) -> None:
    """Run the job in `config` with trlX in its environment; returns when it finished (`status.state` finished) or
    stopped (`stopped`: a set `status.stop_requested` is sent to the runner as SIGTERM, and it saves the
    iterations done at the end of the current one); the caller writes the report. Raises TrlxConfigError /
    TrlxEngineError (with the runner's log tail) otherwise. `on_step` gets each iteration's metrics record, in
    this thread."""
    from services.trainer.run import await_reward_service, prepare_run_folder, run_prompts

    python = trlx_python()
    check_engine_environment(python, config)
    run_dir = config.run_dir
    if config.train.resume and (found := _existing_checkpoints(config)):
        raise TrlxConfigError(f"train.engine=trlx cannot resume ({', '.join(found[-3:])} exist in {run_dir}): trlX "
                              "has no way to restore its optimizer, KL controller and data position into its "
                              "training loop. Add --fresh (train.resume=false) to start over (the old run folder is "
                              "moved aside to <run>.replaced-<UTC time>), or pass --run-name NAME for another run")
    train_prompts, eval_set = run_prompts(config, prompts, eval_prompts)
    prepare_run_folder(config, eval_set)
    if not await_reward_service(config, status):
        return
    status.state = "starting"

    work = run_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    try:
        _prepare_and_run(config, python, work, train_prompts, eval_set, status, on_step)
    finally:
        for folder in ("model", "tokenizer", "template", "trlx"):  # the copies; spec and log stay for a look
            shutil.rmtree(work / folder, ignore_errors=True)


def _prepare_and_run(config: TrainerConfig, python: Path, work: Path, train_prompts: list[str], eval_set: list[str],
                     status: TrainingStatus, on_step) -> None:
    prepared = prepare_model(config, work)
    check_trlx_config(config, model_config=prepared["model_config"])
    tokenizer = prepared.pop("tokenizer")
    run_root = config.train.checkpoint_dir.resolve()
    spec = {
        "trlx_config": trlx_config(config, prepared["model_dir"], prepared["tokenizer_dir"], work / "trlx"),
        "config": config.model_dump(mode="json"),  # as native checkpoints' manifests hold it (no API keys)
        "checkpoint_root": str(run_root),
        "template": prepared["template"],
        "eos_token": prepared["eos_token"],
        "prompts": _cyclic_multiple(train_prompts, config.method.chunk_size),
        "eval_prompts": [p for p in eval_set for _ in range(config.train.eval_samples_per_prompt)],
        "token_check": _token_check(tokenizer, train_prompts[:16] + eval_set[:16]),
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    status.step = status.start_step = 0
    status.history = []  # this run's records, as metrics.jsonl gets them (a trlX run starts from scratch)
    _run_child(config, python, spec_path, work / "runner.log", status, on_step)


def _source_root() -> Path | None:
    """The checkout this module runs from, when it runs from one (not from an installed wheel, whose parent folder is
    site-packages and must never reach the trlX environment's path)."""
    return ROOT if (ROOT / "pyproject.toml").is_file() and (ROOT / "services" / "trainer").is_dir() else None


def _child_env(config: TrainerConfig, events_fd: int) -> dict[str, str]:
    env = dict(os.environ)
    source = _source_root()
    if source is not None:  # this checkout's runner, whichever checkout the trlX environment was built from
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    env.update({
        EVENTS_FD_ENV: str(events_fd),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",  # progress bars would drown runner.log; the parent logs each iteration
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(config.train.torch_threads),
    })
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)  # one process of its own, whatever launched this one
    if config.reward.api_key:  # never on disk: the spec has the config without keys
        env["REWARD_API_KEY"] = config.reward.api_key
    return env


def _run_child(config: TrainerConfig, python: Path, spec_path: Path, log_path: Path, status: TrainingStatus,
               on_step) -> None:
    read_fd, write_fd = os.pipe()
    events: queue.Queue = queue.Queue()
    with open(log_path, "wb") as log_file:
        try:
            # Same process group: a Ctrl-C reaches it too (it then saves at the end of its iteration, as a SIGTERM
            # makes it), and whoever kills this group (`rlhf up` after its stop grace) kills it with it.
            child = subprocess.Popen(
                [str(python), "-m", "services.trainer.trlx_runner", str(spec_path)],
                cwd=_source_root() or spec_path.parent, env=_child_env(config, write_fd), stdout=log_file,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
    reader = threading.Thread(target=_read_events, args=(read_fd, events), name="trlx-events", daemon=True)
    reader.start()
    log.info("trlX runner started (pid %d, log %s)", child.pid, log_path)
    follower = _RunnerFollower(child, status, on_step)
    try:
        follower.follow(events, reader)
    except BaseException:  # Ctrl-C here, or an on_step that raised: the runner saves its iteration and exits
        _stop_child(child)
        raise
    rc = child.wait()
    if rc == 0 and follower.final_state in ("finished", "stopped"):
        status.state = follower.final_state
        return
    tail = _tail(log_path)
    why = follower.error or (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
    raise TrlxEngineError(f"the trlX runner failed ({why}); last lines of {log_path}:\n{tail}")


class _RunnerFollower:
    """The runner's events applied to `status` as they come; a requested stop forwarded to it as SIGTERM."""

    def __init__(self, child: subprocess.Popen, status: TrainingStatus, on_step):
        self.child, self.status, self.on_step = child, status, on_step
        self.final_state: str | None = None
        self.error: str | None = None
        self.signalled = False
        self.ready = False  # the runner said it is up
        self.last_iteration = time.perf_counter()

    def follow(self, events: queue.Queue, reader: threading.Thread) -> None:
        """Until the runner has exited and its pipe is drained."""
        while True:
            self._forward_stop()
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if self.child.poll() is not None and not reader.is_alive():
                    return
                continue
            if event is None:  # the pipe closed: the child is gone or going
                self.child.wait()
                continue
            self.ready = True
            self._apply(event)

    def _forward_stop(self) -> None:
        # Only once the runner said it is up: before its SIGTERM handler is installed a SIGTERM would kill it.
        if self.ready and self.status.stop_requested.is_set() and not self.signalled and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)  # it saves at the end of the iteration it is in, then exits 0
            self.signalled = True
            if self.status.state == "running":
                self.status.state = "stopping"

    def _apply(self, event: dict) -> None:
        kind, status = event.get("type"), self.status
        if kind == "record":
            self._record(event["record"])
        elif kind == "checkpoint":
            status.last_checkpoint = event["name"]
            status.best_checkpoint = event.get("best")
        elif kind == "state":
            self.final_state = event["state"]
            if self.final_state == "running":
                self.last_iteration = time.perf_counter()
                status.state = "stopping" if self.signalled else "running"
        elif kind == "error":
            self.error = event.get("error")

    def _record(self, record: dict) -> None:
        status = self.status
        status.history.append(record)
        if "eval/reward_mean" in record:
            status.eval_reward_mean = record["eval/reward_mean"]
        if "rollout/reward_mean" not in record:
            return
        status.step = record["step"]
        status.reward_mean, status.kl = record["rollout/reward_mean"], record["objective/kl"]
        now = time.perf_counter()
        elapsed, self.last_iteration = now - self.last_iteration, now
        status.iteration_seconds = elapsed if status.iteration_seconds is None else \
            0.8 * status.iteration_seconds + 0.2 * elapsed
        log.info("trlX iteration %d/%d: reward %.3f, kl %.3f, %.2f s", record["step"], status.total,
                 record["rollout/reward_mean"], record["objective/kl"], record["time/iteration"])
        if self.on_step:
            self.on_step(record)


def _stop_child(child: subprocess.Popen) -> None:
    """SIGTERM (the runner saves the iteration it is in), then a kill after the stop grace."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=stop_grace_s())
        except subprocess.TimeoutExpired:
            log.error("the trlX runner did not stop within %g s; killing it", stop_grace_s())
            child.kill()
            child.wait()


def _read_events(fd: int, events: queue.Queue) -> None:
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            try:
                events.put(json.loads(line))
            except ValueError:
                log.warning("unreadable event from the trlX runner: %.200r", line)
    events.put(None)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


if __name__ == "__main__":  # `python -m services.trainer.trlx_engine [python]`: check the environment
    logging.basicConfig(level=logging.INFO)
    try:
        check_engine_environment(sys.argv[1] if len(sys.argv) > 1 else None)
    except TrlxEngineError as exc:
        sys.exit(str(exc))
    print("trlX environment OK:", json.dumps(engine_versions(sys.argv[1] if len(sys.argv) > 1 else None)))
