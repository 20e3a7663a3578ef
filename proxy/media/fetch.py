"""Remote media URLs (images, videos), fetched by the proxy on the client's behalf and guarded
against SSRF.

A URL the client names is an instruction to make the proxy open connections from inside the
network it runs in. The rules, applied to the first URL and to every redirect hop alike:

- http and https only; no credentials in the URL; a host that is a DNS name or a standard IP
  literal (legacy numeric forms such as `2130706433`, `0x7f000001`, `127.1` are refused:
  resolvers disagree on what they mean);
- with `--image-fetch-allowed-domains`, the host must be one of those domains or below one;
- the host is resolved once, and every address it resolves to must be public (not loopback,
  private, link-local, CGNAT, cloud metadata, multicast, unspecified, reserved or broadcast,
  nor an IPv6 form that embeds such an IPv4 address); the connection then goes to exactly
  those vetted addresses (a pinned resolver, so nothing is resolved twice and a DNS answer
  cannot change in between), with the URL's host kept for the Host header and TLS SNI;
- redirects are followed by hand, at most `MAX_REDIRECTS`;
- connect and total timeouts; the body is read in chunks and dropped as soon as it passes
  the byte cap; its first bytes must be a signature of the part's kind (JPEG, PNG, GIF or
  WebP for images; Content-Type is not trusted); no compression is negotiated, so the cap
  counts the bytes that arrive; the cap and the total timeout are the kind's
  (`MediaKind.fetch_max_bytes`, `fetch_timeout_s`);
- environment proxy settings are ignored: a forward proxy would connect to names the guard
  never saw.

Clients get 400 envelopes with the part's kind's codes (`image_url_forbidden`,
`image_fetch_failed`, `image_fetch_timeout`, `image_too_large`, `invalid_image`; the same
with `video_` for videos), never resolved addresses or exception text; the log has the
details. Every rule here takes the part's `MediaKind`: there is no default kind.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..error_catalogue import (
    APIError,
)
from ..request.limits import MIB
from .kinds import REMOTE_SCHEMES, MediaKind, MediaRef

log = logging.getLogger("proxy.fetch")

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]
ConnectorFactory = Callable[[AbstractResolver], aiohttp.BaseConnector]

_T = TypeVar("_T")

# A DNS name as it reaches the resolver (yarl has already IDNA-encoded it).
_HOST_NAME = re.compile(
    r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*"
)
# WHATWG URL: a host whose last label is a number is an IPv4 address in some notation.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")

_METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


@dataclass(frozen=True)
class FetchPolicy:
    """Each field is the flag `--image-fetch-<field>` (proxy/config.py), but `enabled`, which
    is `--image-fetch` itself (whether remote media URLs of any kind are fetched at all), and
    the `video_` fields, `--video-fetch-<field>`. A kind reads its own fields through
    `MediaKind.fetch_max_bytes` and `fetch_timeout_s`; the others apply to every kind."""

    enabled: bool = True
    allowed_domains: tuple[str, ...] = ()
    # Test-only: URL hosts (as written in the URL) exempt from the public-address rule.
    allow_private_hosts: tuple[str, ...] = ()
    max_bytes: int = 20 * MIB
    connect_timeout_s: float = 5.0
    timeout_s: float = 20.0
    concurrency: int = 4
    # Videos are larger and slower to fetch than images (flags --video-fetch-*).
    video_max_bytes: int = 64 * MIB
    video_timeout_s: float = 60.0


# ---- errors ----------------------------------------------------------------------------


def forbidden(kind: MediaKind, param: str, reason: str) -> APIError:
    return kind.forbidden_url(param, message=f"The {kind.name} URL is not allowed: {reason}.")


# ---- address and URL rules (pure) ------------------------------------------------------


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses that embed no non-public IPv4."""
    if ip in _METADATA_ADDRESSES:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        embedded = embedded_ipv4(ip)
        if embedded is not None:
            # The IPv4 address it stands for decides (Python calls these ranges reserved or
            # private even around public addresses, e.g. NAT64 answers from DNS64).
            return is_public_address(embedded)
    elif ip == _BROADCAST or ip in _CGNAT:
        return False
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_private
    )


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: mapped, translated, compatible, 6to4, NAT64."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64 or ip in _IPV4_TRANSLATED:
        return low32
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # ::a.b.c.d; :: and ::1 are themselves
        return low32
    return None


def domain_allowed(host: str, allowed: Sequence[str]) -> bool:
    return any(host == domain or host.endswith("." + domain) for domain in allowed)


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_media_url(url: str, param: str, kind: MediaKind) -> URL:
    try:
        parsed = URL(url.strip())
    except (ValueError, TypeError):
        raise kind.bad_url(param, message=f"The {kind.name} URL is not a valid URL.") from None
    return parsed


def check_url(url: URL, policy: FetchPolicy, param: str, kind: MediaKind) -> str:
    """The URL's normalised host, after the checks that need no DNS; raises 400 otherwise."""
    if (url.scheme or "").lower() not in REMOTE_SCHEMES:
        raise forbidden(kind, param, "only http and https URLs are fetched")
    if url.raw_user is not None or url.raw_password is not None:
        raise forbidden(kind, param, "URLs with credentials are not fetched")
    try:
        url.port  # noqa: B018 - raises for an out-of-range port
    except ValueError:
        raise forbidden(kind, param, "the port is not valid") from None
    literal = ip_literal(url.host or "")
    # IP literals in their parsed form; names as aiohttp will look them up (IDNA-encoded).
    host = str(literal) if literal is not None else (url.raw_host or "").lower().rstrip(".")
    if not host:
        raise kind.bad_url(param, message=f"The {kind.name} URL has no host.")
    if literal is None:
        if not _HOST_NAME.fullmatch(host):
            raise forbidden(kind, param, "the host is not a valid host name")
        if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
            raise forbidden(kind, param, "hosts in numeric notation must be standard IP addresses")
    if policy.allowed_domains and (
        literal is not None or not domain_allowed(host, policy.allowed_domains)
    ):
        raise forbidden(kind, param, "the host is not on this server's list of allowed domains")
    if host in policy.allow_private_hosts:
        return host
    if literal is not None and not is_public_address(literal):
        raise forbidden(kind, param, "it points to a private, local or reserved address")
    if host == "localhost" or host.endswith(".localhost"):
        raise forbidden(kind, param, "it points to a private, local or reserved address")
    return host


# ---- resolution and connecting to vetted addresses -------------------------------------


async def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (getaddrinfo off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one batch of fetches: answers only with addresses vetted for
    that host beforehand, so aiohttp connects where the guard looked, never re-resolving."""

    def __init__(self) -> None:
        self._pins: dict[str, list[str]] = {}

    def pin(self, host: str, addresses: list[str]) -> None:
        self._pins[_pin_key(host)] = list(addresses)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self._pins.get(_pin_key(host))
        if not addresses:
            raise OSError(f"refusing to resolve unvetted host {host!r}")
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": socket.IPPROTO_TCP,
                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        pass


def _pin_key(host: str) -> str:
    return host.lower().rstrip(".")


def default_connector(resolver: AbstractResolver) -> aiohttp.BaseConnector:
    # No DNS cache: every connection asks the pinned resolver.
    return aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)


# ---- the fetcher -----------------------------------------------------------------------


class GuardedFetcher:
    """Fetches the remote media of one request at a time under `policy`.

    `resolve` and `connector_factory` are seams for tests (a stub resolver, a connector that
    records connection attempts).
    """

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolve: Resolve = system_resolve,
        connector_factory: ConnectorFactory = default_connector,
    ) -> None:
        self.policy = policy
        self._resolve = resolve
        self._connector_factory = connector_factory

    async def fetch_all(self, refs: Sequence[MediaRef]) -> list[bytes]:
        """The media, fetched concurrently (bounded), in order; the first failure wins."""
        resolver = PinnedResolver()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.policy.connect_timeout_s)
        async with aiohttp.ClientSession(
            connector=self._connector_factory(resolver),
            timeout=timeout,
            trust_env=False,
            auto_decompress=False,
            headers={
                "Accept": ", ".join(dict.fromkeys(f"{ref.kind.name}/*" for ref in refs)),
                "Accept-Encoding": "identity",
                "User-Agent": "qwen-vl-openai-proxy (media fetch)",
            },
        ) as session:
            fetches = [functools.partial(self.fetch, session, resolver, ref) for ref in refs]
            return await gather_bounded(fetches, self.policy.concurrency)

    async def fetch(
        self, session: aiohttp.ClientSession, resolver: PinnedResolver, ref: MediaRef
    ) -> bytes:
        kind = ref.kind
        timeout_s = kind.fetch_timeout_s(self.policy)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._follow(session, resolver, ref)
        except TimeoutError:
            log.info("%s fetch for %s timed out", kind.name, ref.param)
            raise kind.fetch_timeout(ref.param, seconds=timeout_s) from None
        except aiohttp.ClientError as exc:
            log.info("%s fetch for %s failed: %r", kind.name, ref.param, exc)
            raise kind.fetch_failed(
                ref.param, reason=f"the {kind.name} server could not be reached"
            ) from None

    async def _follow(
        self, session: aiohttp.ClientSession, resolver: PinnedResolver, ref: MediaRef
    ) -> bytes:
        kind = ref.kind
        url = parse_media_url(ref.url, ref.param, kind)
        for hop in range(MAX_REDIRECTS + 1):
            await self._vet(url, resolver, ref)
            async with session.get(url, allow_redirects=False) as response:
                if response.status in REDIRECT_STATUSES:
                    url = _redirect_target(url, response, ref)
                    log.debug("fetch for %s: redirect %d", ref.param, hop + 1)
                    continue
                if response.status != 200:
                    raise kind.fetch_failed(
                        ref.param, reason=f"the {kind.name} server answered HTTP {response.status}"
                    )
                max_bytes = kind.fetch_max_bytes(self.policy)
                return await read_capped(response, max_bytes, ref)
        raise kind.fetch_failed(ref.param, reason=f"more than {MAX_REDIRECTS} redirects")

    async def _vet(self, url: URL, resolver: PinnedResolver, ref: MediaRef) -> None:
        """Refuses the URL unless its host and every address it resolves to are allowed."""
        param, kind = ref.param, ref.kind
        host = check_url(url, self.policy, param, kind)
        if ip_literal(host) is not None:
            return  # aiohttp connects to a literal directly; check_url has vetted it
        assert url.port is not None
        try:
            addresses = await self._resolve(host, url.port)
        except OSError as exc:
            log.info("%s fetch for %s: resolving %r failed: %r", kind.name, param, host, exc)
            raise kind.fetch_failed(param, reason="the host name could not be resolved") from None
        parsed = [ip_literal(address.split("%", 1)[0]) for address in addresses]
        if not parsed or any(ip is None for ip in parsed):
            raise kind.fetch_failed(param, reason="the host name could not be resolved")
        if host not in self.policy.allow_private_hosts and not all(
            is_public_address(ip) for ip in parsed if ip is not None
        ):
            log.warning("fetch for %s refused: %r resolves to %s", param, host, addresses)
            raise forbidden(kind, param, "it points to a private, local or reserved address")
        resolver.pin(host, addresses)


def _redirect_target(url: URL, response: aiohttp.ClientResponse, ref: MediaRef) -> URL:
    location = response.headers.get("Location", "")
    try:
        target = url.join(URL(location)) if location else None
    except (ValueError, TypeError):
        target = None
    if target is None or not target.scheme:
        raise ref.kind.fetch_failed(ref.param, reason="a redirect had no valid Location")
    return target  # vetted like any URL before it is fetched


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int, ref: MediaRef) -> bytes:
    """The body, read in chunks and abandoned (connection closed) past `max_bytes` or as soon
    as its first bytes are not a signature of the part's kind."""
    kind, param = ref.kind, ref.param
    if response.content_length is not None and response.content_length > max_bytes:
        response.close()
        raise kind.too_many_bytes(param, max_bytes)
    body = bytearray()
    sniffed = False
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            response.close()
            raise kind.too_many_bytes(param, max_bytes)
        if not sniffed and len(body) >= kind.sniff_bytes:
            sniffed = True
            if not kind.recognise(bytes(body[: kind.sniff_bytes])):
                response.close()
                raise kind.not_this_kind(param)
    if not kind.recognise(bytes(body)):
        raise kind.not_this_kind(param)
    return bytes(body)


async def gather_bounded(jobs: Sequence[Callable[[], Awaitable[_T]]], limit: int) -> list[_T]:
    """Runs at most `limit` jobs at a time, results in order; the first failure cancels the rest."""
    semaphore = asyncio.Semaphore(limit)

    async def bounded(job: Callable[[], Awaitable[_T]]) -> _T:
        async with semaphore:
            return await job()

    tasks = [asyncio.ensure_future(bounded(job)) for job in jobs]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise
