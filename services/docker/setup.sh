#!/bin/sh
# The one-shot `setup` service (installed as rlhf-setup): fills the model volume before the services start, so the
# reward and generator containers can mount it read-only and load offline.
#   RLHF_PRESET=tiny  builds the offline tiny kit into /models/tiny (reused when present)
#   otherwise         downloads REWARD_MODEL and POLICY_MODEL into the hub cache (HF_HOME), unless HF_HUB_OFFLINE
#                     is set; local paths (/models/...) are left alone
# Then it checks that both load (their configs), and exits non-zero with the reason when one does not.
set -eu
if [ "${RLHF_PRESET:-}" = tiny ]; then
  rlhf models build-tiny --out /models/tiny
fi
exec python3 - "reward=${REWARD_MODEL:-}" "policy=${POLICY_MODEL:-}" <<'PY'
# Fail here, in seconds and with the reason, rather than in a service that then waits on its health check: each model
# must be a local folder or a hub id whose config loads (downloaded first unless offline). A non-zero exit keeps the
# services that depend on setup from starting.
import sys

from huggingface_hub import constants, snapshot_download
from transformers import AutoConfig

from shared.modeling import load_pretrained, looks_local

failures = 0
for role, source in (arg.split("=", 1) for arg in sys.argv[1:]):
    if not source:
        continue
    try:
        if not looks_local(source) and not constants.HF_HUB_OFFLINE:
            # PyTorch weights only: TF, Flax, ONNX and friends would multiply the download.
            snapshot_download(source, ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "onnx/*",
                                                       "coreml/*", "tf_model*", "flax_model*", "rust_model*"])
        load_pretrained(AutoConfig, source)
        print(f"{role} model {source}: ready", flush=True)
    except Exception as exc:  # noqa: BLE001 - any reason it cannot load, said in one line
        reason = " ".join(str(exc).split())[:500] or type(exc).__name__
        print(f"error: the {role} model {source!r} cannot be loaded: {reason}", file=sys.stderr, flush=True)
        failures += 1
sys.exit(1 if failures else 0)
PY
