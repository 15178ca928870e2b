#!/bin/sh
# The one-shot `setup` service (installed as rlhf-setup): fills the model volume before the services start, so the
# reward and generator containers can mount it read-only and load offline.
#   RLHF_PRESET=tiny  builds the offline tiny kit into /models/tiny (reused when present)
#   otherwise         downloads REWARD_MODEL and POLICY_MODEL into the hub cache (HF_HOME), unless HF_HUB_OFFLINE
#                     is set; local paths (/models/...) are left alone
set -eu
if [ "${RLHF_PRESET:-}" = tiny ]; then
  rlhf models build-tiny --out /models/tiny
fi
exec python3 - "${REWARD_MODEL:-}" "${POLICY_MODEL:-}" <<'PY'
import sys

from huggingface_hub import constants, snapshot_download

from shared.modeling import looks_local

hub_ids = [s for s in dict.fromkeys(sys.argv[1:]) if s and not looks_local(s)]
if hub_ids and constants.HF_HUB_OFFLINE:
    print(f"HF_HUB_OFFLINE is set: {hub_ids} must already be in {constants.HF_HUB_CACHE}", flush=True)
    sys.exit(0)
for repo_id in hub_ids:
    # PyTorch weights only: TF, Flax, ONNX and friends would multiply the download.
    path = snapshot_download(repo_id, ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite",
                                                       "onnx/*", "coreml/*", "tf_model*", "flax_model*",
                                                       "rust_model*"])
    print(f"{repo_id}: {path}", flush=True)
PY
