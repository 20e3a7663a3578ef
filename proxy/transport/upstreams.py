"""Many Triton replicas behind one `Backend`.

`--triton-url` takes a comma-separated list of `host:port` targets; each host may resolve to
several addresses (a Kubernetes headless Service), and is resolved again every
`RESOLVE_EVERY_S`, so replicas that come and go are picked up without a restart. Every
address gets its own gRPC channel (`TritonBackend`): one HTTP/2 connection per replica,
which a plain Service would pin to one pod.

A new request goes to the available upstream with the fewest requests in flight (ties: the
one used longest ago), unless routing is `affinity` and it names a LoRA adapter or carries an
image or video: then to the upstream a rendezvous hash of the adapter and its first medium's
digest prefers (`affinity_pick`), where that adapter is resident and that image's embedding
cached, as long as that upstream is not busier than `BOUNDED_LOAD_FACTOR` times its fair
share. An upstream that fails before the first token (unreachable, model
unavailable, its queue full) is marked down for `DOWN_FOR_S` and the request is retried once
on another; after a token has been sent nothing is retried, and the error ends the stream as
with one Triton. While every upstream is down, requests still try the one that failed
longest ago, so one restarted Triton is found again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from ..error_catalogue import BACKEND_UNAVAILABLE, APIError
from .backend import Backend, GenerationChunk, TritonBackend, TritonRequest
from .contract import ModelLimits, Task

log = logging.getLogger("proxy.upstreams")

RESOLVE_EVERY_S = 10.0
DOWN_FOR_S = 5.0
# Failures before the first token that another replica may not share.
RETRYABLE = frozenset({"backend_unavailable", "model_unavailable", "server_busy"})
# Routing policies (--routing): `affinity` sends requests with an adapter or media where their
# caches are (bounded load); `least-busy` ignores what a request carries.
AFFINITY = "affinity"
LEAST_BUSY = "least-busy"
ROUTING_POLICIES = (AFFINITY, LEAST_BUSY)
# An affinity request goes to its preferred upstream while that one holds at most this times
# the mean load (the request counted), else to the least busy: consistent hashing with
# bounded loads (Mirrokni et al.), whose 1.25 keeps most requests on their cache while no
# upstream gets more than a quarter above its share from a popular adapter or image.
BOUNDED_LOAD_FACTOR = 1.25
# A medium's digest for routing covers its first bytes and its length: encoded images differ
# within their first kilobytes, and hashing a 20 MB upload whole would hold the event loop.
AFFINITY_DIGEST_BYTES = 1 << 16

Resolver = Callable[[str, int], Awaitable[list[str]]]
BackendFactory = Callable[[str], Backend]
# (upstream address, media items of a finished generation, how many its cache answered)
MediaObserver = Callable[[str, int, int], None]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` has (IPv4 and IPv6), in the resolver's order, deduplicated."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def parse_targets(text: str) -> list[tuple[str, int]]:
    """`host:port,host:port,...`; IPv6 literals in brackets (`[::1]:8001`)."""
    targets = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"expected host:port, got {item!r}")
        targets.append((host.strip("[]"), int(port)))
    if not targets:
        raise ValueError("no Triton target given")
    return targets


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Upstream:
    address: str
    backend: Backend
    in_flight: int = 0
    down_until: float = 0.0
    last_used: float = 0.0
    requests: int = 0
    failures: int = 0
    retired: bool = False  # no longer resolved: closed once idle
    _order: int = field(default_factory=itertools.count().__next__)


class Upstreams:
    """`Backend` over every address of every target; create it inside the serving loop."""

    def __init__(
        self,
        targets: list[tuple[str, int]],
        *,
        resolve: Resolver = resolve_host,
        backend_factory: BackendFactory = TritonBackend,
        clock: Callable[[], float] = time.monotonic,
        resolve_every_s: float = RESOLVE_EVERY_S,
        observe: Callable[[str, str], None] = lambda upstream, outcome: None,
        routing: str = AFFINITY,
        observe_media: MediaObserver = lambda upstream, items, hits: None,
    ) -> None:
        self._targets = targets
        self._resolve = resolve
        self._factory = backend_factory
        self._clock = clock
        self._resolve_every_s = resolve_every_s
        self._observe = observe  # (upstream address, outcome) per generation
        self._routing = routing
        self._observe_media = observe_media
        self._upstreams: dict[str, Upstream] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._resolved_once = asyncio.Lock()
        self._resolved = False

    # ---- membership --------------------------------------------------------------------

    @property
    def upstreams(self) -> list[Upstream]:
        return [u for u in self._upstreams.values() if not u.retired]

    async def replicas(self) -> list[tuple[str, Backend]]:
        """(address, backend) of every upstream: for what each replica must do (LoRA loads)."""
        await self._ensure_resolved()
        return [(u.address, u.backend) for u in self.upstreams]

    async def refresh(self) -> None:
        """Resolves every target again: new addresses join, vanished ones leave once idle."""
        wanted: list[str] = []
        for host, port in self._targets:
            try:
                addresses = await self._resolve(host, port)
            except OSError as exc:
                log.warning("resolving Triton target %s failed: %r", host, exc)
                # keep what this target had: a DNS blip must not empty the pool
                wanted += [a for a in self._upstreams if a.endswith(f":{port}")]
                continue
            wanted += [_address(address, port) for address in addresses]
        for address in dict.fromkeys(wanted):
            upstream = self._upstreams.get(address)
            if upstream is None:
                log.info("Triton upstream %s joins", address)
                self._upstreams[address] = Upstream(address, self._factory(address))
            else:
                upstream.retired = False
        for address, upstream in list(self._upstreams.items()):
            if address not in wanted and not upstream.retired:
                log.info("Triton upstream %s leaves (no longer resolved)", address)
                upstream.retired = True
        await self._close_retired()
        self._resolved = True

    async def _ensure_resolved(self) -> None:
        if self._resolved:
            return
        async with self._resolved_once:
            if not self._resolved:
                await self.refresh()
        if self._refresher is None and self._resolve_every_s > 0:
            self._refresher = asyncio.create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._resolve_every_s)
            with contextlib.suppress(Exception):
                await self.refresh()

    async def _close_retired(self) -> None:
        for address, upstream in list(self._upstreams.items()):
            if upstream.retired and upstream.in_flight == 0:
                del self._upstreams[address]
                await upstream.backend.close()

    # ---- choosing ----------------------------------------------------------------------

    def pick(self, exclude: set[str] = frozenset()) -> Upstream | None:
        """The available upstream with the fewest in flight; while all are down, the one that
        went down first."""
        now = self._clock()
        candidates = [u for u in self.upstreams if u.address not in exclude]
        up = [u for u in candidates if u.down_until <= now]
        if up:
            return min(up, key=least_busy)
        return min(candidates, key=lambda u: u.down_until, default=None)

    def pick_for(self, request: TritonRequest, exclude: set[str] = frozenset()) -> Upstream | None:
        """The upstream for `request`: `affinity_pick` by its adapter and first medium under
        the affinity policy, else (or with neither) `pick`."""
        if self._routing == AFFINITY and (request.lora or any(request.media.values())):
            now = self._clock()
            up = [u for u in self.upstreams if u.address not in exclude and u.down_until <= now]
            if len(up) > 1:
                return affinity_pick(up, affinity_key(request))
        return self.pick(exclude)

    def _mark_down(self, upstream: Upstream, exc: APIError) -> None:
        upstream.failures += 1
        upstream.down_until = self._clock() + DOWN_FOR_S
        log.warning(
            "Triton upstream %s marked down for %gs: %s", upstream.address, DOWN_FOR_S, exc.code
        )

    # ---- Backend -----------------------------------------------------------------------

    async def generate(
        self, request: TritonRequest, request_id: str
    ) -> AsyncGenerator[GenerationChunk, None]:
        await self._ensure_resolved()
        tried: set[str] = set()
        upstream = self.pick_for(request)
        if upstream is None:
            raise BACKEND_UNAVAILABLE()
        for attempt in range(2):
            tried.add(upstream.address)
            upstream.in_flight += 1
            upstream.requests += 1
            upstream.last_used = self._clock()
            started = False
            log.debug("request %s: Triton upstream %s", request_id, upstream.address)
            outcome = "failed"
            cache_hits = 0
            try:
                async with contextlib.aclosing(
                    upstream.backend.generate(request, request_id)
                ) as chunks:
                    async for chunk in chunks:
                        started = True
                        if chunk.media_cache_hits is not None:
                            cache_hits = chunk.media_cache_hits
                        yield chunk
                outcome = "ok"
                self._count_media(upstream, request, cache_hits)
                return
            except (GeneratorExit, asyncio.CancelledError):
                outcome = "cancelled"  # the client went away, or a deadline passed
                raise
            except APIError as exc:
                if exc.code not in RETRYABLE:
                    raise
                self._mark_down(upstream, exc)
                retry = None if started or attempt == 1 else self.pick_for(request, tried)
                if retry is None:  # streaming already, retried already, or no other replica
                    raise
                outcome = "retried"
                log.info("request %s: retrying on Triton upstream %s", request_id, retry.address)
            finally:
                upstream.in_flight -= 1
                self._observe(upstream.address, outcome)
                if upstream.retired:
                    await self._close_retired()
            upstream = retry

    def _count_media(self, upstream: Upstream, request: TritonRequest, cache_hits: int) -> None:
        items = sum(len(elements) for elements in request.media.values())
        if items and request.task is Task.GENERATE:
            self._observe_media(upstream.address, items, cache_hits)

    async def is_ready(self, model: str) -> bool:
        await self._ensure_resolved()
        checks = [u.backend.is_ready(model) for u in self.upstreams]
        for ready in asyncio.as_completed(checks):
            if await ready:
                return True
        return False

    async def repository_index(self) -> dict[str, str]:
        await self._ensure_resolved()
        return await self._first("repository_index")

    async def describe(self, model: str) -> ModelLimits | None:
        """The model's limits from an upstream that is up (replicas run the same model)."""
        await self._ensure_resolved()
        return await self._first("describe", model)

    async def load_model(self, model: str) -> None:
        """Every replica loads it (lazy load): any of them may get the next request."""
        await self._ensure_resolved()
        await asyncio.gather(*(u.backend.load_model(model) for u in self.upstreams))

    async def _first(self, method: str, *args):
        error: BaseException | None = None
        for upstream in sorted(self.upstreams, key=lambda u: u.down_until):
            try:
                return await getattr(upstream.backend, method)(*args)
            except Exception as exc:  # the next replica may answer
                error = exc
        if isinstance(error, APIError):
            raise error
        raise BACKEND_UNAVAILABLE() if error is None else error

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for upstream in list(self._upstreams.values()):
            await upstream.backend.close()
        self._upstreams.clear()


def affinity_key(request: TritonRequest) -> bytes:
    """What places a request: its adapter and its first medium's digest (the model caches a
    medium's embeddings per adapter, so the pair is what a replica's cache holds)."""
    first = next((elements[0] for elements in request.media.values() if elements), b"")
    medium = hashlib.blake2b(first[:AFFINITY_DIGEST_BYTES], digest_size=16)
    medium.update(len(first).to_bytes(8, "little"))
    return (request.lora or "").encode("utf-8") + b"\0" + medium.digest()


def affinity_pick(up: list[Upstream], key: bytes) -> Upstream:
    """Rendezvous hashing over the available upstreams `up`: the one `key` scores highest on
    (the same one for the same key while the set stays, and a replica that leaves moves only
    its own keys); the least busy instead when that one is past its bounded load."""
    preferred = max(up, key=lambda u: hashlib.blake2b(key + u.address.encode()).digest())
    load = sum(u.in_flight for u in up) + 1  # this request's included
    if preferred.in_flight + 1 <= math.ceil(BOUNDED_LOAD_FACTOR * load / len(up)):
        return preferred
    return min(up, key=least_busy)


def least_busy(upstream: Upstream) -> tuple[int, float, int]:
    """Fewest in flight first; ties: the one used longest ago."""
    return (upstream.in_flight, upstream.last_used, upstream._order)
