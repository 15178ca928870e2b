"""Checks for tests/e2e/compose_smoke.sh, one subcommand each; stdlib only (runs with the host's python3).

  ports                      compose publishes every port on 127.0.0.1, and on BIND_ADDRESS when that is set (reward
                             publishes none: reward-gateway has its port, so reward scales)
  images IMAGE...            no layer holds the build context (history and every layer's files)
  containers PROJECT         docker inspect: hardening, limits, restart policies, ports, read-only mounts, keys
  runtime PROJECT SERVICE... inside the running containers: non-root, no capabilities, read-only root, writable /tmp
  wait-step MIN_STEP         polls the trainer's /v1/status until step >= MIN_STEP; prints the step
  checkpoint MIN_STEP        the generator lists a valid tiny/step-N with N >= MIN_STEP; prints N
  served STEPS               the generator serves tiny/step-STEPS as latest and the reward service scores its text
  auth                       without a key: 401 everywhere; model admin refused to the scoring key
  admin on|off               on: the admin key passes the guard; off: admin routes answer 403 to every key
  replicas PROJECT N         N healthy reward replicas; reward-gateway spreads host connections over them; the
                             trainer image's RewardClient finds all N behind `reward` and spreads chunks over them

The API keys come from the environment (REWARD_API_KEY, GENERATOR_API_KEY, TRAINER_API_KEY, REWARD_ADMIN_API_KEY),
as docker compose gets them; unset means the services run without keys.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

REWARD, GENERATOR, TRAINER = "http://127.0.0.1:18000", "http://127.0.0.1:18001", "http://127.0.0.1:18002"
KEYS = {"reward": ["REWARD_API_KEY", "REWARD_ADMIN_API_KEY"], "generator": ["GENERATOR_API_KEY"],
        "trainer": ["TRAINER_API_KEY", "REWARD_API_KEY", "GENERATOR_API_KEY"], "setup": [], "reward-gateway": []}
PUBLISHED = ["generator", "reward-gateway", "trainer"]  # reward itself publishes nothing: it scales
# A model PUT /v1/models may load: the startup model of the tiny preset (the source policy always allows those).
ADMIN_SPEC = {"source": "/models/tiny/tiny-sentiment", "label": "POSITIVE"}
# Paths of the build context that must never be in an image layer (the context copy, tests, git, local wheels).
FORBIDDEN = re.compile(r"^(tmp/src(/|$)|app/tests(/|$)|app/\.env|(.*/)?\.git(/|$)|(.*/)?torch-[^/]*\.whl$|"
                       r"(.*/)?services/docker/)")


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def key(name: str) -> str | None:
    return os.environ.get(name) or None


def call(url: str, body=None, key: str | None = None, method: str | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def ok(url: str, body=None, key: str | None = None) -> object:
    status, out = call(url, body, key)
    if status != 200:
        fail(f"{url} answered {status}: {out}")
    return out


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


def ports() -> None:
    compose = [*os.environ.get("COMPOSE", "docker compose").split(), "--env-file", "configs/tiny.env", "config",
               "--format", "json"]
    env = {k: v for k, v in os.environ.items() if k != "BIND_ADDRESS"}
    for bind in (None, "0.0.0.0"):
        out = subprocess.run(compose, check=True, capture_output=True, text=True,
                             env=env | ({"BIND_ADDRESS": bind} if bind else {})).stdout
        published = {s: [p.get("host_ip") for p in v.get("ports", [])] for s, v in json.loads(out)["services"].items()}
        expected = bind or "127.0.0.1"
        if sorted(s for s, ips in published.items() if ips) != PUBLISHED or \
                any(ip != expected for ips in published.values() for ip in ips):
            fail(f"BIND_ADDRESS={bind}: ports published on {published}")
        print(f"BIND_ADDRESS {bind or 'unset'}: {', '.join(PUBLISHED)} published on {expected} only; reward on none",
              flush=True)


def images(names: list[str]) -> None:
    for name in names:
        history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", name)
        if "/tmp/src" in history:
            fail(f"{name}: a history step copies the build context:\n{history}")
        layers = files = 0
        seen = set()
        with subprocess.Popen(["docker", "save", name], stdout=subprocess.PIPE) as proc:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
                for member in outer:
                    if not (member.isfile() and (member.name.endswith("layer.tar") or "blobs/" in member.name)):
                        continue
                    try:
                        inner = tarfile.open(fileobj=outer.extractfile(member), mode="r|")
                    except tarfile.ReadError:  # an OCI config or manifest blob, not a layer
                        continue
                    layers += 1
                    with inner:
                        for f in inner:
                            path = f.name.removeprefix("./")
                            files += 1
                            seen.add(path)
                            if FORBIDDEN.match(path):
                                fail(f"{name}: layer {member.name} holds {path}")
        if proc.returncode:
            fail(f"docker save {name} exited {proc.returncode}")
        for needed in ("opt/venv/bin/rlhf", "app/configs/tiny.yaml", "etc/passwd"):
            if needed not in seen:
                fail(f"{name}: no layer holds {needed} (the scan read nothing?)")
        print(f"{name}: {layers} layers, {files} files, no build context (no tmp/src, app/tests, .git, wheels); "
              f"history: {' | '.join(h[:40] for h in history.splitlines()[:4])}", flush=True)


def containers(project: str) -> None:
    ids = docker("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}").split()
    found = {}
    for c in json.loads(docker("inspect", *ids)):
        found[c["Config"]["Labels"]["com.docker.compose.service"]] = c
    if sorted(found) != ["generator", "reward", "reward-gateway", "setup", "trainer"]:
        fail(f"containers of {project}: {sorted(found)}")
    restart = {"setup": ("no", ""), "reward": ("unless-stopped",), "generator": ("unless-stopped",),
               "trainer": ("on-failure",), "reward-gateway": ("unless-stopped",)}
    read_only = {"setup": set(), "reward": {"/models"}, "generator": {"/models", "/checkpoints"}, "trainer": set(),
                 "reward-gateway": set()}
    bind = os.environ.get("BIND_ADDRESS", "127.0.0.1")
    for service, c in sorted(found.items()):
        h, cfg = c["HostConfig"], c["Config"]
        problems = []
        if "no-new-privileges:true" not in (h.get("SecurityOpt") or []):
            problems.append(f"SecurityOpt {h.get('SecurityOpt')}")
        if [x.upper() for x in h.get("CapDrop") or []] != ["ALL"]:
            problems.append(f"CapDrop {h.get('CapDrop')}")
        if not h.get("ReadonlyRootfs"):
            problems.append("root filesystem writable")
        if "/tmp" not in (h.get("Tmpfs") or {}):
            problems.append(f"Tmpfs {h.get('Tmpfs')}")
        if not h.get("Memory"):
            problems.append("no memory limit")
        if cfg.get("User") != "app":
            problems.append(f"User {cfg.get('User')!r}")
        if h["RestartPolicy"]["Name"] not in restart[service]:
            problems.append(f"RestartPolicy {h['RestartPolicy']}")
        for port, bindings in (h.get("PortBindings") or {}).items():
            if any(b.get("HostIp") != bind for b in bindings or []):
                problems.append(f"port {port} published on {bindings}")
        mounts = {m["Destination"]: m["RW"] for m in c["Mounts"]}
        for path in read_only[service]:
            if mounts.get(path, True):
                problems.append(f"{path} mounted read-write")
        env = dict(e.split("=", 1) for e in cfg["Env"] if "=" in e)  # a bare NAME (unset in compose) is not passed
        for name in KEYS[service]:
            if env.get(name) != os.environ.get(name):  # set: the same value; unset: absent, not empty
                problems.append(f"{name}={env.get(name)!r} (expected {os.environ.get(name)!r})")
        if service == "trainer":
            grace = cfg.get("StopTimeout")
            if not grace or grace < 60:
                problems.append(f"StopTimeout {grace}")
        if problems:
            fail(f"{service}: " + "; ".join(problems))
        print(f"{service}: no-new-privileges, cap_drop ALL, read-only root + tmpfs /tmp, memory "
              f"{h['Memory'] // 2**20} MiB, user app, restart {h['RestartPolicy']['Name'] or 'no'}, ports on {bind}, "
              f"read-only {sorted(read_only[service]) or '-'}, keys {[k for k in KEYS[service] if k in env] or '-'}"
              + (f", stop grace {cfg.get('StopTimeout')}s" if service == "trainer" else ""), flush=True)


def runtime(project: str, services: list[str]) -> None:
    probe = ("grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; id -u; "
             "if touch /opt/venv/probe 2>/dev/null; then echo root-writable; fi; "
             "touch /tmp/probe && echo tmp-writable")
    compose = os.environ.get("COMPOSE", "docker compose").split()
    for service in services:
        out = subprocess.run([*compose, "-p", project, "--env-file", "configs/tiny.env", "exec", "-T", service,
                              "sh", "-c", probe], check=True, capture_output=True, text=True).stdout
        facts = dict(re.findall(r"^(NoNewPrivs|CapEff):\s*(\S+)", out, re.M))
        if facts != {"NoNewPrivs": "1", "CapEff": "0000000000000000"} or "\n10001\n" not in f"\n{out}" \
                or "root-writable" in out or "tmp-writable" not in out:
            fail(f"{service}: inside the container: {out!r}")
        print(f"{service}: uid 10001, NoNewPrivs 1, no effective capabilities, root filesystem read-only, /tmp "
              f"writable", flush=True)


def wait_step(min_step: int, timeout: float = 1200) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            status, out = call(f"{TRAINER}/v1/status", key=key("TRAINER_API_KEY"))
        except OSError:
            status, out = None, None
        if status == 200:
            last = out
            if out["state"] in ("failed", "finished", "stopped"):
                fail(f"the trainer ended before step {min_step}: {out}")
            if out["step"] >= min_step:
                print(out["step"], flush=True)
                return
        elif status is not None:
            fail(f"/v1/status answered {status}: {out}")
        time.sleep(0.5)
    fail(f"no step {min_step} after {timeout}s: {last}")


def checkpoints() -> dict:
    listing = ok(f"{GENERATOR}/v1/checkpoints", key=key("GENERATOR_API_KEY"))
    return {c["name"]: c for c in listing["checkpoints"]}


def checkpoint(min_step: int) -> None:
    steps = [int(n.split("-")[-1]) for n, c in checkpoints().items()
             if n.startswith("tiny/step-") and c["valid"]]
    if not steps or max(steps) < min_step:
        fail(f"no valid tiny/step-N with N >= {min_step}: {sorted(steps)}")
    print(max(steps), flush=True)


def served(steps: int) -> None:
    name = f"tiny/step-{steps}"
    listing = checkpoints()
    if not listing.get(name, {}).get("valid"):
        fail(f"{name} is not served: {listing}")
    out = ok(f"{GENERATOR}/v1/generate", {"prompts": ["I watched The", "The story follows"], "checkpoint": "latest",
                                         "max_new_tokens": 20, "seed": 1}, key("GENERATOR_API_KEY"))
    if out["checkpoint"] != name:
        fail(f"latest is {out['checkpoint']}, not {name}")
    texts = [c["text"] for c in out["completions"]]
    scores = ok(f"{REWARD}/v1/score", {"texts": texts}, key("REWARD_API_KEY"))["scores"]
    if len(scores) != 2 or not all(0 <= s <= 1 for s in scores):
        fail(f"scores {scores}")
    print(f"generator served {name}: {texts}; reward scores {scores}", flush=True)


def auth() -> None:
    guarded = [("reward", f"{REWARD}/v1/score", {"texts": ["fine"]}, "REWARD_API_KEY"),
               ("generator", f"{GENERATOR}/v1/checkpoints", None, "GENERATOR_API_KEY"),
               ("trainer", f"{TRAINER}/v1/status", None, "TRAINER_API_KEY")]
    for service, url, body, name in guarded:
        if not key(name):
            fail(f"{name} is not set: auth needs every key")
        for given, expected in ((None, 401), ("wrong-key", 401), (key(name), 200)):
            status, out = call(url, body, given)
            if status != expected:
                fail(f"{service} {url} with key {given!r}: {status} (expected {expected}): {out}")
        print(f"{service}: no key 401, wrong key 401, {name} 200", flush=True)
    for url in (f"{REWARD}/readyz", f"{GENERATOR}/readyz"):
        status, _ = call(url)
        if status != 200:
            fail(f"{url} without a key: {status} (readyz must need none)")
    spec = ADMIN_SPEC
    for method, body in (("PUT", spec), ("DELETE", None)):
        status, out = call(f"{REWARD}/v1/models/extra", body, key("REWARD_API_KEY"), method)
        if status not in (401, 403):
            fail(f"{method} /v1/models/extra with the scoring key: {status} {out}")
        print(f"reward: {method} /v1/models with the scoring key {status}", flush=True)


def admin(state: str) -> None:
    spec = ADMIN_SPEC
    if state == "off":
        for given in (None, key("REWARD_API_KEY"), key("REWARD_ADMIN_API_KEY"), "any-key"):
            for method, body in (("PUT", spec), ("DELETE", None)):
                status, out = call(f"{REWARD}/v1/models/extra", body, given, method)
                if status != 403:
                    fail(f"admin off: {method} /v1/models/extra with key {given!r}: {status} {out}")
        print("reward: admin key unset: PUT and DELETE /v1/models answer 403 to every key", flush=True)
        return
    admin_key = key("REWARD_ADMIN_API_KEY")
    for given in (None, "wrong-key"):
        status, out = call(f"{REWARD}/v1/models/extra", spec, given, "PUT")
        if status != 401:
            fail(f"admin on: PUT /v1/models/extra with key {given!r}: {status} {out}")
    status, out = call(f"{REWARD}/v1/models/extra", spec, admin_key, "PUT")
    if status in (401, 403):
        fail(f"PUT /v1/models/extra with the admin key: {status} {out}")
    note = f"PUT with the admin key {status}"
    if status in (200, 201):
        deleted, out = call(f"{REWARD}/v1/models/extra", None, admin_key, "DELETE")
        if deleted not in (200, 204):
            fail(f"DELETE /v1/models/extra with the admin key: {deleted} {out}")
        note += f", DELETE {deleted}"
    print(f"reward: admin on: PUT without or with a wrong key 401; {note}", flush=True)


SCORED = re.compile(r'^reward_requests_total\{(?=[^}]*route="/v1/score")(?=[^}]*status="200")[^}]*\} (\S+)$', re.M)
CLIENT_PROBE = """
import json, os
from shared.clients import RewardClient
with RewardClient("http://reward:8000", chunk_size=2, api_key=os.environ.get("REWARD_API_KEY") or None) as c:
    scores = c.score(["A fine film.", "Dull and long."] * 8)
    print(json.dumps({"replicas": [r.name for r in c.replicas], "answered": [r.answered for r in c.replicas],
                      "scores": scores}))
"""


def replicas(project: str, n: int) -> None:
    """`n` reward containers, all healthy; connections through reward-gateway reach every one of them; and the
    trainer image's RewardClient, given `http://reward:8000` as in the compose file, finds `n` replicas and
    sends chunks to each."""
    ids = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                 "--filter", "label=com.docker.compose.service=reward").split()
    health = {c["Name"]: c["State"].get("Health", {}).get("Status") for c in json.loads(docker("inspect", *ids))}
    if len(ids) != n or set(health.values()) != {"healthy"}:
        fail(f"reward replicas: {health} (expected {n}, all healthy)")

    def scored() -> list[float]:
        probe = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
        return [sum(float(v) for v in SCORED.findall(docker("exec", i, "python3", "-c", probe))) for i in ids]

    before = scored()
    for _ in range(4 * n):  # urllib: a new connection each time
        ok(f"{REWARD}/v1/score", {"texts": ["A fine film."]}, key("REWARD_API_KEY"))
    through_gateway = [b - a for a, b in zip(before, scored())]
    if min(through_gateway) < 1:
        fail(f"reward-gateway: requests per replica {through_gateway}")
    compose = os.environ.get("COMPOSE", "docker compose").split()
    done = subprocess.run([*compose, "-p", project, "--env-file", "configs/tiny.env", "run", "--rm", "--no-deps", "-T",
                           "--entrypoint", "python3", "trainer", "-c", CLIENT_PROBE],
                          check=True, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines:  # some compose versions exit 0 from `run` whatever the command did: its stderr says why
        fail(f"the trainer's RewardClient printed nothing:\n{done.stderr[-3000:]}")
    seen = json.loads(lines[-1])
    if len(seen["replicas"]) != n or min(seen["answered"]) < 1 or len(seen["scores"]) != 16:
        fail(f"the trainer's RewardClient: {seen}")
    print(f"{n} reward replicas healthy; through reward-gateway {through_gateway} requests each; the trainer's "
          f"RewardClient: {seen['replicas']}, {seen['answered']} chunks each", flush=True)


def main(argv: list[str]) -> None:
    command, args = argv[0], argv[1:]
    if command == "ports":
        ports()
    elif command == "images":
        images(args)
    elif command == "containers":
        containers(args[0])
    elif command == "runtime":
        runtime(args[0], args[1:])
    elif command == "wait-step":
        wait_step(int(args[0]))
    elif command == "checkpoint":
        checkpoint(int(args[0]))
    elif command == "served":
        served(int(args[0]))
    elif command == "auth":
        auth()
    elif command == "admin":
        admin(args[0])
    elif command == "replicas":
        replicas(args[0], int(args[1]))
    else:
        fail(f"unknown check {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
