"""Several reward replicas, spread by the client: RewardClient and the trainer against real `rlhf reward serve`
processes on loopback (the tiny sentiment classifier, one torch thread each), one of them killed mid-call and
mid-training, then started again; and a host name with several addresses over TLS (Host header and SNI kept)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from services.trainer.config import RewardConfig, load_config
from services.trainer.rewards import wait_for_reward_service
from services.trainer.run import train
from shared.clients import RetryPolicy, RewardClient
from shared.readiness import NotReady, wait_until_ready
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

# A deadline that outlives a replica's restart, and short down times so re-admission is quick to see.
RETRY = RetryPolicy(deadline_s=60, backoff_base=0.05, backoff_max=0.5)
FAST = dict(retry=RETRY, down_s=0.2, down_max_s=1.0)


class ReplicaProcess:
    """`rlhf reward serve` of the tiny sentiment classifier in a subprocess on a fixed loopback port."""

    def __init__(self, kit: Path, log_dir: Path, name: str):
        self.kit, self.log_path = kit, log_dir / f"{name}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> ReplicaProcess:
        cmd = [sys.executable, "-m", "services.cli", "reward", "serve", "--model", str(self.kit / "tiny-sentiment"),
               "--port", str(self.port), "--torch-threads", "1", "--device", "cpu", "--log-level", "warning"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        return self

    def wait_ready(self, timeout: float = 180) -> ReplicaProcess:
        def alive() -> None:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]

        try:
            wait_until_ready(self.url, timeout, alive=alive, max_delay=0.1)
        except NotReady as exc:
            raise RuntimeError(f"replica {self.url} not ready ({exc}):\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def kill(self) -> None:
        """SIGKILL: the process dies with its connections, as a crashed container does."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def scored(self) -> int:
        """POST /v1/score requests this process answered 200 (its own /metrics)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return int(sum(float(v) for v in re.findall(
            r'^reward_requests_total\{(?=[^}]*route="/v1/score")(?=[^}]*status="200")[^}]*\} (\S+)$', text, re.M)))


@pytest.fixture(scope="module")
def replicas(tiny_kit, tmp_path_factory):
    """Two replicas, started together; each test leaves both running (a killed one is started again)."""
    logs = tmp_path_factory.mktemp("replicas")
    pair = [ReplicaProcess(tiny_kit, logs, name) for name in ("a", "b")]
    for r in pair:
        r.start()
    try:
        for r in pair:
            r.wait_ready()
        yield pair
    finally:
        for r in pair:
            r.stop()


@pytest.fixture(scope="module")
def texts(tiny_kit) -> list[str]:
    lines = (tiny_kit / "corpus" / "heldout.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()][:120]


@pytest.fixture(scope="module")
def expected(replicas, texts) -> list[float]:
    """The scores of `texts` from one replica alone, as a single-URL client gets them."""
    with RewardClient(replicas[0].url) as one:
        return one.score(texts)


def ensure_running(replica: ReplicaProcess) -> None:
    if replica.proc.poll() is not None:
        replica.start().wait_ready()


def by_url(client: RewardClient) -> dict:
    return {r.url: r for r in client.replicas}


def test_a_list_of_urls_spreads_the_chunks_of_a_call_over_both_replicas(replicas, texts, expected):
    a, b = replicas
    before = [a.scored(), b.scored()]
    with RewardClient([a.url, b.url], chunk_size=10) as client:
        assert [r.name for r in client.replicas] == [a.url, b.url]
        assert client.score(texts) == pytest.approx(expected, abs=1e-5)
        answered = {url: r.answered for url, r in by_url(client).items()}
    assert sum(answered.values()) == len(texts) // 10 and min(answered.values()) >= 2  # both got a share
    assert a.scored() - before[0] == answered[a.url] and b.scored() - before[1] == answered[b.url]
    # Comma-separated is the same list; a small call still goes to both (one chunk per replica that is up).
    with RewardClient(f"{a.url}, {b.url}/") as client:
        assert client.score(texts[:6]) == pytest.approx(expected[:6], abs=1e-5)
        assert sorted(r.answered for r in client.replicas) == [1, 1]


def test_a_replica_killed_mid_call_loses_no_chunk_and_scores_stay_in_order(replicas, texts, expected):
    a, b = replicas
    many = texts * 25  # 3000 texts in 300 chunks: seconds of work, so the kill lands mid-call
    client = RewardClient([a.url, b.url], chunk_size=10, **FAST)
    replica_b = by_url(client)[b.url]
    killed = threading.Event()

    def kill_b_once_it_served_some() -> None:
        deadline = time.monotonic() + 120
        while replica_b.answered < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        b.kill()
        killed.set()

    killer = threading.Thread(target=kill_b_once_it_served_some)
    killer.start()
    try:
        scores = client.score(many)
    finally:
        killer.join()
        client.close()
    assert killed.is_set() and scores == pytest.approx(expected * 25, abs=1e-5)
    assert replica_b.failed >= 1 and not replica_b.up  # its chunks failed there and went to the other replica
    assert by_url(client)[a.url].answered > replica_b.answered
    ensure_running(b)


def test_a_dead_replica_is_skipped_and_readmitted_once_ready_again(replicas, texts, expected):
    a, b = replicas
    b.kill()
    client = RewardClient([a.url, b.url], chunk_size=10, **FAST)
    replica_a, replica_b = by_url(client)[a.url], by_url(client)[b.url]
    try:
        assert client.score(texts) == pytest.approx(expected, abs=1e-5)
        assert not replica_b.up and replica_b.answered == 0
        failed = replica_b.failed
        for _ in range(5):  # while down it gets no request: everything goes to a, no retry wasted on b
            assert client.score(texts[:40]) == pytest.approx(expected[:40], abs=1e-5)
        assert replica_b.failed == failed and replica_b.answered == 0
        b.start()  # loading: /readyz answers 503, and the probes keep it out until it is ready
        b.wait_ready()
        before_b = b.scored()
        deadline = time.monotonic() + 10
        while not replica_b.up and time.monotonic() < deadline:
            client.score(texts[:20])  # picks trigger the probes
            time.sleep(0.1)
        assert replica_b.up, "the restarted replica was not re-admitted"
        answered_a = replica_a.answered
        assert client.score(texts) == pytest.approx(expected, abs=1e-5)
        # shared again (how evenly depends on which replica frees up first on a busy machine)
        assert replica_b.answered >= 1 and replica_a.answered - answered_a >= 1
        assert b.scored() - before_b == replica_b.answered
    finally:
        client.close()
        ensure_running(b)


def test_killing_one_of_two_replicas_mid_training_loses_no_step(replicas, tiny_kit, tmp_path, caplog):
    a, b = replicas
    steps = 8
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={tmp_path}",
        f"reward.url=[{a.url}, {b.url}]", "reward.retry_deadline_s=120", f"train.total_steps={steps}",
        "train.tensorboard=false", "train.checkpoint_interval=100", "train.eval_interval=100",
        "data.eval_prompts=4", "method.num_rollouts=16", "method.chunk_size=16", "method.ppo_epochs=1"])
    assert config.reward.url == f"{a.url},{b.url}"
    metrics = config.run_dir / "metrics.jsonl"
    served = {"before": b.scored()}

    def trained_steps() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return sum("rollout/reward_mean" in line for line in lines)

    def kill_b_at_step_2() -> None:
        deadline = time.monotonic() + 600
        while trained_steps() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        served["at_kill"], served["step"] = b.scored(), trained_steps()
        b.kill()

    killer = threading.Thread(target=kill_b_at_step_2)
    killer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="shared.clients"):
            status = train(config)
    finally:
        killer.join()
    assert 2 <= served["step"] < steps  # killed mid-run
    assert f"replica {b.url} marked down" in caplog.text  # the trainer's client saw it die and went on without it
    assert status.state == "finished", status.message
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = [row["step"] for row in rows if "rollout/reward_mean" in row]
    assert sorted(trained) == list(range(1, steps + 1))  # every iteration, once
    assert b.proc.returncode == -signal.SIGKILL
    assert served["at_kill"] > served["before"]  # b took part in the first steps
    ensure_running(b)


def test_the_trainer_waits_for_any_replica_and_reads_url_lists(replicas):
    a, b = replicas
    dead = f"http://127.0.0.1:{free_port()}"
    wait_for_reward_service(f"{dead},{a.url}", deadline_s=10)  # one ready replica is enough
    assert RewardConfig(url=[a.url, b.url + "/"]).url == f"{a.url},{b.url}"
    assert RewardConfig(url=f"{a.url} , {b.url}").url == f"{a.url},{b.url}"
    assert RewardConfig(url=a.url).url == a.url
    with pytest.raises(ValueError, match="empty URL"):
        RewardConfig(url=[])


# -- a host name with several addresses, over TLS -------------------------------------------------------------------

def tls_files(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=reward.test", "-addext", "subjectAltName=DNS:reward.test", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert, key


def echo_app(name: str, seen: list) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request) -> dict:
        body = await request.json()
        seen.append((name, request.headers.get("host")))
        return {"scores": [float(len(t)) for t in body["texts"]]}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


@pytest.mark.skipif(not any((Path(p) / "openssl").exists() for p in os.environ.get("PATH", "").split(":")),
                    reason="needs the openssl command")
def test_a_name_with_two_addresses_is_two_replicas_reached_by_address_with_the_names_host_header_and_tls(tmp_path):
    """reward.test resolves (here: a stub resolver) to 127.0.0.1 and 127.0.0.2, one TLS server on each with a
    certificate for reward.test only: the client connects by address, and still sends Host: reward.test:<port>
    and verifies the certificate against the name (SNI)."""
    cert, key = tls_files(tmp_path)
    port, seen, servers = free_port(), [], []
    for address in ("127.0.0.1", "127.0.0.2"):
        server = uvicorn.Server(uvicorn.Config(echo_app(address, seen), host=address, port=port, log_level="warning",
                                               ssl_certfile=str(cert), ssl_keyfile=str(key)))
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
    try:
        deadline = time.monotonic() + 20
        while not all(s.started for s in servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        resolved = []

        def resolve(host: str, p: int) -> list[str]:
            resolved.append((host, p))
            return ["127.0.0.1", "127.0.0.2"]

        trusted = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(cert)))
        with RewardClient(f"https://reward.test:{port}", chunk_size=2, transport=trusted, resolve=resolve,
                          retry=RetryPolicy(max_retries=0)) as client:
            texts = ["a" * n for n in range(1, 13)]
            assert client.score(texts) == [float(n) for n in range(1, 13)]
            assert [r.url for r in client.replicas] == [f"https://127.0.0.1:{port}", f"https://127.0.0.2:{port}"]
        assert resolved[0] == ("reward.test", port)
        assert {name for name, _ in seen} == {"127.0.0.1", "127.0.0.2"}
        assert {host for _, host in seen} == {f"reward.test:{port}"}
        # Without the name as SNI the certificate (reward.test only) would not match an address: the check is real.
        with pytest.raises(httpx.ConnectError, match="certificate|hostname|match"):
            httpx.Client(transport=httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(cert)))).post(
                f"https://127.0.0.1:{port}/v1/score", json={"texts": ["a"]})
    finally:
        for s in servers:
            s.should_exit = True


def test_a_single_url_is_used_as_written_and_one_address_is_not_rewritten():
    with RewardClient("http://localhost:9") as client:  # localhost: one IPv4 address, so one replica, as written
        assert [(r.url, r.host) for r in client.replicas] == [("http://localhost:9", None)]
    with RewardClient("http://reward:8000", resolve=lambda h, p: ["10.1.0.7"]) as client:
        assert [(r.url, r.host) for r in client.replicas] == [("http://reward:8000", None)]
    with RewardClient("http://reward:8000", resolve=lambda h, p: ["10.1.0.8", "10.1.0.7"]) as client:
        assert [(r.url, r.host) for r in client.replicas] == [("http://10.1.0.8:8000", "reward:8000"),
                                                               ("http://10.1.0.7:8000", "reward:8000")]
