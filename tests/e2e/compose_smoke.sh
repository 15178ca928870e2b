#!/usr/bin/env bash
# Proves `docker compose up` on a machine with a Docker engine but no image registry:
#   1. builds a local base image (a debootstrap Debian root with python3, imported with `docker import`),
#   2. builds the three service images on it, and checks no image layer holds the build context,
#   2b. a missing reward model: `docker compose up` fails within seconds with setup's reason; nothing else starts,
#   3. runs the tiny preset through `docker compose up` (the tiny kit is built inside, into the model volume) with
#      many PPO iterations, and at step 2 stops the trainer the way `docker compose stop` does (SIGTERM, then the
#      grace period): it must exit 0 having saved a checkpoint of the step it reached,
#   4. checks every container's hardening (docker inspect, and from inside: uid, capabilities, read-only root),
#   5. starts the trainer again with TOTAL_STEPS: it resumes and finishes; the trained checkpoint must be served by
#      the generator container and scored by the reward container,
#   5b. scales the reward service to 2 replicas (docker compose up --scale reward=2): both healthy, the host's
#      connections through reward-gateway reach both, the trainer image's RewardClient spreads chunks over both,
#   6. with --keys (make compose-smoke-keys): every API key set, every check sends them, and requests without a key
#      get 401, model admin is refused to the scoring key, and answers 403 once the admin key is unset;
#      without --keys: no key set, and model admin answers 403,
#   7. tears everything down (containers, volumes, network), also on failure.
# Usage: make compose-smoke | make compose-smoke-keys   (root; starts dockerd with the vfs driver if no engine answers)
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
keys=0
[ "${1:-}" = --keys ] && keys=1
project=rlhfsmoke
base_image=${BASE_IMAGE:-rlhf-base:bookworm}
steps=${TOTAL_STEPS:-6}
compose="docker compose"
docker compose version >/dev/null 2>&1 || compose="${COMPOSE:-.venv/bin/docker-compose}"
export COMPOSE=$compose
say() { printf '[compose-smoke %4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
dc() { $compose -p $project --env-file configs/tiny.env "$@"; }
check() { python3 tests/e2e/compose_checks.py "$@"; }

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

export BASE_IMAGE=$base_image RLHF_TAG=smoke REWARD_PORT=18000 GENERATOR_PORT=18001 TRAINER_PORT=18002
unset BIND_ADDRESS TRAINER_STOP_GRACE
if [ $keys = 1 ]; then
  export REWARD_API_KEY=smoke-reward-key REWARD_ADMIN_API_KEY=smoke-admin-key GENERATOR_API_KEY=smoke-generator-key \
    TRAINER_API_KEY=smoke-trainer-key
else
  unset REWARD_API_KEY REWARD_ADMIN_API_KEY GENERATOR_API_KEY TRAINER_API_KEY
fi
cleanup() {
  code=$?
  if [ $code != 0 ]; then
    say "failed ($code): the last log lines of every service"
    dc logs --no-color --tail 25 2>&1 || true
  fi
  say "tearing down"
  dc down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT

# One at a time: reward and generator then share one builder stage (the second is a cache hit). The log is long.
build_log=/tmp/rlhf-compose-build.log
: >"$build_log"
for service in reward generator trainer; do
  say "building the $service image (log: $build_log)"
  DOCKER_BUILDKIT=0 dc build "$service" >>"$build_log" 2>&1 || { tail -n 40 "$build_log"; exit 1; }
done
say "checking the published ports (docker compose config)"
check ports
say "checking the images hold no build context (docker history, docker save)"
check images rlhf-reward:smoke rlhf-generator:smoke rlhf-trainer:smoke

# A model that cannot load: setup fails in seconds with the reason, and no service that depends on it starts (the
# tiny kit it builds first stays in the model volume for the run below).
say "docker compose up with a missing reward model: it must fail fast, with the reason"
# (Its exit code is not checked: some compose versions exit 0 from `up -d` when a dependency fails.)
REWARD_MODEL=/models/tiny/no-such-model dc up -d >/tmp/rlhf-failfast.log 2>&1 || true
grep -q "didn't complete successfully" /tmp/rlhf-failfast.log || { cat /tmp/rlhf-failfast.log; exit 1; }
dc logs setup 2>&1 | grep -q "the reward model '/models/tiny/no-such-model' cannot be loaded: model folder" \
  || { say "setup did not say why"; dc logs setup; exit 1; }
running=$(dc ps --services --filter status=running)
[ -z "$running" ] || { say "started despite the failed setup: $running"; exit 1; }
dc rm -fs >/dev/null 2>&1

# Many iterations, so the trainer is mid-run when it is stopped.
export TOTAL_STEPS=1000
say "docker compose up (tiny preset$([ $keys = 1 ] && echo ', every API key set'))"
dc up -d
reached=$(check wait-step 2)
say "the trainer reached step $reached"
if [ $keys = 1 ]; then
  say "checking the API keys (while the trainer runs)"
  check auth
  check admin on
fi
say "docker compose stop trainer"
stop_started=$(date +%s)
dc stop trainer
trainer=$(dc ps -a -q trainer)
code=$(docker inspect -f '{{.State.ExitCode}}' "$trainer")
dc logs --no-color trainer | tail -n 3
[ "$code" = 0 ] || { say "the stopped trainer exited with $code (not a clean stop)"; exit 1; }
saved=$(check checkpoint "$reached")
say "stopped in $(( $(date +%s) - stop_started ))s, exit 0, checkpoint tiny/step-$saved saved (step reached: $reached)"

say "checking the containers (docker inspect, and from inside)"
check containers $project
check runtime $project reward generator

export TOTAL_STEPS=$steps
say "starting the trainer again with TOTAL_STEPS=$steps: it resumes from step $saved"
dc up -d --no-deps trainer
trainer=$(dc ps -a -q trainer)
code=$(docker wait "$trainer")
dc logs --no-color trainer | tail -n 5
[ "$code" = 0 ] || { say "the trainer exited with $code"; exit 1; }

say "checking the trained checkpoint is served and scored"
check served "$steps"
dc exec -T generator test -s /checkpoints/tiny/report.md

say "docker compose up --scale reward=2"
dc up -d --no-deps --wait --scale reward=2 reward
check replicas $project 2
if [ $keys = 1 ]; then
  say "restarting the reward service without REWARD_ADMIN_API_KEY"
  unset REWARD_ADMIN_API_KEY
  dc up -d --no-deps --wait reward
  check admin off
  say "ok: docker compose up with every API key trained, stopped cleanly, resumed, served and scored the tiny preset"
else
  check admin off
  say "ok: docker compose up trained, stopped cleanly, resumed, served and scored the tiny preset"
fi
