#!/usr/bin/env bash
# Proves `docker compose up` on a machine with a Docker engine but no image registry:
#   1. builds a local base image (a debootstrap Debian root with python3, imported with `docker import`),
#   2. builds the three service images on it,
#   3. runs the tiny preset through `docker compose up` (the tiny kit is built inside, into the model volume),
#   4. checks the trained checkpoint is served by the generator container and scored by the reward container,
#   5. tears everything down (containers, volumes, network), also on failure.
# Usage: make compose-smoke   (root; starts dockerd with the vfs driver if no engine answers)
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
project=rlhfsmoke
base_image=${BASE_IMAGE:-rlhf-base:bookworm}
steps=${TOTAL_STEPS:-6}
compose="docker compose"
docker compose version >/dev/null 2>&1 || compose="${COMPOSE:-.venv/bin/docker-compose}"
say() { printf '[compose-smoke %4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }

if ! docker info >/dev/null 2>&1; then
  say "no Docker engine answers: starting dockerd (vfs storage driver)"
  (dockerd --storage-driver=vfs >/tmp/rlhf-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi

if ! docker image inspect "$base_image" >/dev/null 2>&1; then
  root=$(mktemp -d /var/tmp/rlhf-base.XXXX)
  say "building the base image $base_image with debootstrap (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root/rootfs" >/dev/null
  # pip in the containers trusts the registries only with this machine's CA bundle.
  cp /etc/ssl/certs/ca-certificates.crt "$root/rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$root/rootfs" -c . | docker import - "$base_image" >/dev/null
  rm -rf "$root"
fi

# A local CPU build of torch, when this machine has one, spares the images a multi-GB CUDA download.
wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
[ -n "$wheel" ] && cp -n "$wheel" services/docker/wheels/ 2>/dev/null || true

export BASE_IMAGE=$base_image RLHF_TAG=smoke TOTAL_STEPS=$steps REWARD_PORT=18000 GENERATOR_PORT=18001 TRAINER_PORT=18002
cleanup() { say "tearing down"; $compose -p $project --env-file configs/tiny.env down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

say "building the images"
DOCKER_BUILDKIT=0 $compose -p $project --env-file configs/tiny.env build
say "docker compose up (tiny preset, $steps PPO iterations)"
$compose -p $project --env-file configs/tiny.env up -d
trainer=$($compose -p $project --env-file configs/tiny.env ps -a -q trainer)
code=$(docker wait "$trainer")
$compose -p $project --env-file configs/tiny.env logs --no-color trainer | tail -n 5
[ "$code" = 0 ] || { say "the trainer exited with $code"; exit 1; }

say "checking the trained checkpoint is served and scored"
python3 - "$steps" <<'PY'
import json, sys, urllib.request

def call(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))

name = f"tiny/step-{sys.argv[1]}"
listing = {c["name"]: c for c in call("http://127.0.0.1:18001/v1/checkpoints")["checkpoints"]}
assert listing[name]["valid"], listing
out = call("http://127.0.0.1:18001/v1/generate", {"prompts": ["I watched The", "The story follows"],
                                                   "checkpoint": "latest", "max_new_tokens": 20, "seed": 1})
assert out["checkpoint"] == name, out["checkpoint"]
scores = call("http://127.0.0.1:18000/v1/score", {"texts": [c["text"] for c in out["completions"]]})["scores"]
assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
print(f"generator served {name}: {[c['text'] for c in out['completions']]}; reward scores {scores}")
PY
$compose -p $project --env-file configs/tiny.env exec -T generator test -s /checkpoints/tiny/report.md
say "ok: docker compose up trained, served and scored the tiny preset"
