"""Reward service replicas as a client sees them: which there are (a list of URLs, or one host name resolving to
several addresses, re-resolved periodically), which are up, and which one takes the next request (the least busy
live one). A replica that fails is marked down for a backoff period and re-admitted once a probe (its /readyz)
answers; `shared.clients` sends the requests."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)


def split_urls(url: str | Sequence[str]) -> list[str]:
    """One URL, several comma-separated in one string, or a list of either: the base URLs, in order, without
    duplicates or trailing slashes."""
    parts = [url] if isinstance(url, str) else list(url)
    urls: list[str] = []
    for part in parts:
        for u in str(part).split(","):
            u = u.strip().rstrip("/")
            if u and u not in urls:
                urls.append(u)
    if not urls:
        raise ValueError(f"no service URL in {url!r}")
    return urls


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address of `host` (getaddrinfo: A and AAAA records), sorted. The IPv4 ones when there are any, else
    the IPv6 ones: a dual-stack replica has one of each and must count once."""
    found: dict[int, set[str]] = {socket.AF_INET: set(), socket.AF_INET6: set()}
    for family, *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = str(sockaddr[0])  # an IP address: AF_INET and AF_INET6 are the families asked for
        if family in found and "%" not in address:  # a link-local address with a scope id is no URL host
            found[family].add(address)
    return sorted(found[socket.AF_INET] or found[socket.AF_INET6], key=ipaddress.ip_address)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@dataclass(eq=False)
class Replica:
    """One place to send requests: `url` to connect to. When `url` names an address that stands for a host name,
    `host` is the name's Host header and `sni` its TLS server name, so virtual hosts, SNI and certificate checks
    see the name, not the address."""

    url: str
    name: str  # in logs and errors: the configured URL, and the address when it was resolved
    host: str | None = None
    sni: str | None = None
    down_until: float | None = None  # None: up; else skipped, and probed from then on until it answers
    failures: int = 0  # in a row
    in_flight: int = 0
    probing: bool = False
    answered: int = 0  # requests it answered (not counting failures), for tests and logs
    failed: int = 0

    @property
    def key(self) -> tuple[str, str | None]:
        return self.url, self.host

    @property
    def up(self) -> bool:
        return self.down_until is None

    @property
    def headers(self) -> dict[str, str] | None:
        return {"host": self.host} if self.host else None

    @property
    def extensions(self) -> dict[str, str] | None:
        return {"sni_hostname": self.sni} if self.sni else None


class ReplicaSet:
    """The replicas behind a list of base URLs, with their health; thread-safe.

    A URL whose host name resolves to several addresses stands for one replica per address (connected to by
    address, with the name as Host header and TLS server name); a URL that resolves to one address, or to none
    yet, is one replica used as written (so a single-URL client works exactly as before). Names are resolved again
    every `resolve_every_s` seconds in a background thread (within a second after a replica fails, or while every
    replica is down), so replicas that come and go are followed; a replica that stays keeps its health.

    `pick()` gives the up replica with the fewest requests in flight (round-robin among equals). A replica that
    `fail()`s is down for `down_s` seconds, doubling with each failure in a row up to `down_max_s` (and at least a
    server's Retry-After, up to that cap); once that is over, `probe` (GET /readyz) runs in the background, again
    after each failed probe, until it answers and the replica is up again. When no replica is up, `pick()` gives
    the one whose down time ends first: the caller's retry, after its backoff, is then the probe. A single replica
    is never probed (its retries are).
    """

    def __init__(self, urls: str | Sequence[str], *, resolve: Callable[[str, int], list[str]] = resolve_addresses,
                 resolve_every_s: float = 10.0, down_s: float = 1.0, down_max_s: float = 30.0,
                 probe: Callable[[Replica], bool] | None = None, name: str = "service"):
        self.urls = split_urls(urls)
        self.resolve, self.resolve_every_s = resolve, resolve_every_s
        self.down_s, self.down_max_s = down_s, down_max_s
        self.probe, self.name = probe, name
        self._lock = threading.Lock()
        self._turn = 0
        self._resolving = False
        self._failed_since_resolve = False  # a replica failed: resolve again soon (it may be gone for good)
        self._replicas: list[Replica] = []
        self._names = any(not _is_ip(httpx.URL(u).host) for u in self.urls)  # anything to resolve again
        self._install(self._expand())

    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def replicas(self) -> list[Replica]:
        """The current replicas (a copy of the list; the objects themselves are live)."""
        with self._lock:
            return list(self._replicas)

    def up_count(self) -> int:
        with self._lock:
            return sum(r.up for r in self._replicas)

    # -- what the replicas are

    def _expand(self) -> list[Replica]:
        out: dict[tuple, Replica] = {}
        for url in self.urls:
            u = httpx.URL(url)
            addresses: list[str] = []
            if u.host and not _is_ip(u.host):
                try:
                    addresses = self.resolve(u.host, u.port or (443 if u.scheme == "https" else 80))
                except (OSError, UnicodeError) as exc:  # not resolvable now: used as written, resolved again later
                    log.debug("%s: could not resolve %s (%s)", self.name, u.host, exc)
            if len(addresses) <= 1:
                found = [Replica(url=url, name=url)]
            else:
                found = [Replica(url=str(u.copy_with(host=a)).rstrip("/"), name=f"{url} ({a})",
                                 host=u.netloc.decode("ascii"), sni=u.host if u.scheme == "https" else None)
                         for a in addresses]
            for r in found:
                out.setdefault(r.key, r)
        return list(out.values())

    def _install(self, found: list[Replica]) -> None:
        """Take the replicas `found`, keeping the state of those already known. Caller holds no lock."""
        with self._lock:
            self._resolved_at = time.monotonic()
            known = {r.key: r for r in self._replicas}
            new = [known.get(r.key, r) for r in found]
            if [r.key for r in new] != [r.key for r in self._replicas]:
                if self._replicas:
                    log.info("%s replicas: %s", self.name, ", ".join(r.name for r in new))
                self._replicas = new

    def _refresh(self) -> None:
        try:
            self._install(self._expand())
        except Exception as exc:  # noqa: BLE001 - keep the replicas known; try again next time
            log.warning("%s: resolving the replicas failed: %s", self.name, exc)
        finally:
            self._resolving = False

    def _maybe_refresh(self, now: float, all_down: bool) -> None:
        """Start a re-resolution in the background when one is due. Caller holds the lock."""
        soon = all_down or self._failed_since_resolve
        due = min(1.0, self.resolve_every_s) if soon else self.resolve_every_s
        if not self._names or self._resolving or now - self._resolved_at < due:
            return
        self._resolving = True
        self._failed_since_resolve = False
        self._resolved_at = now
        threading.Thread(target=self._refresh, name="replica-resolve", daemon=True).start()

    # -- health

    def _down_for(self, r: Replica, retry_after: float | None = None) -> float:
        period = min(self.down_max_s, self.down_s * 2 ** max(0, r.failures - 1))
        return max(period, min(retry_after or 0.0, self.down_max_s))

    def pick(self) -> Replica:
        """The replica for the next request (its in-flight count is raised; end with `done` or `fail`)."""
        now = time.monotonic()
        with self._lock:
            replicas = self._replicas
            up = [r for r in replicas if r.up]
            self._maybe_refresh(now, all_down=not up)
            if len(replicas) > 1 and self.probe is not None:
                for r in replicas:
                    if r.down_until is not None and not r.probing and now >= r.down_until:
                        r.probing = True
                        threading.Thread(target=self._probe, args=(r, self.probe), name="replica-probe",
                                         daemon=True).start()
            if up:
                self._turn += 1
                n = len(up)
                r = min((up[(self._turn + i) % n] for i in range(n)), key=lambda r: r.in_flight)
            else:
                r = min(replicas, key=lambda r: r.down_until or 0.0)  # all down: none is None
            r.in_flight += 1
            return r

    def others_up(self, replica: Replica) -> bool:
        """Whether a replica other than `replica` is up (a failed request can go there at once)."""
        with self._lock:
            return any(r.up and r is not replica for r in self._replicas)

    def done(self, r: Replica) -> None:
        """`r` answered (any answer that is not a failure of the replica itself): it is up."""
        with self._lock:
            r.in_flight -= 1
            r.answered += 1
            r.failures = 0
            if not r.up and len(self._replicas) > 1:
                log.info("%s replica %s answers again: back in use", self.name, r.name)
            r.down_until = None

    def fail(self, r: Replica, why: str, retry_after: float | None = None) -> None:
        """`r` failed a request (no connection, a timeout, a 5xx, 429): down for a while."""
        now = time.monotonic()
        with self._lock:
            r.in_flight -= 1
            r.failed += 1
            was_up = r.up
            if r.down_until is None or now >= r.down_until:  # not for each request already in flight when it went down
                r.failures += 1
            period = self._down_for(r, retry_after)
            r.down_until = max(r.down_until or 0.0, now + period)
            self._failed_since_resolve = True
            if was_up and len(self._replicas) > 1:
                log.warning("%s replica %s marked down for %.1f s: %s", self.name, r.name, period, why)

    def _probe(self, r: Replica, probe: Callable[[Replica], bool]) -> None:
        try:
            ok = bool(probe(r))
        except Exception:  # noqa: BLE001 - an unreachable replica stays down
            ok = False
        with self._lock:
            r.probing = False
            if r.up:
                return
            if ok:
                r.down_until = None
                log.info("%s replica %s is ready again: back in use", self.name, r.name)
            else:
                r.failures += 1
                r.down_until = time.monotonic() + self._down_for(r)
