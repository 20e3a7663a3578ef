"""The media fetcher's pure rules: which addresses are public, which URLs pass before DNS,
and which limits each media kind fetches under."""

from __future__ import annotations

import ipaddress

import pytest
from yarl import URL

from proxy.errors import APIError
from proxy.media.fetch import (
    FetchPolicy,
    check_url,
    domain_allowed,
    embedded_ipv4,
    is_public_address,
)
from proxy.media.images import IMAGE
from proxy.media.kinds import MediaKind
from proxy.media.videos import VIDEO
from proxy.request.limits import RequestLimits


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "93.184.216.34",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",  # mapped, but of a public address
        "2002:808:808::1",  # 6to4 of 8.8.8.8
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    ],
)
def test_public_addresses(address):
    assert is_public_address(ipaddress.ip_address(address)) is True


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",  # CGNAT
        "100.127.255.254",
        "169.254.169.254",  # cloud metadata
        "169.254.0.1",
        "192.0.0.1",
        "192.0.2.1",  # documentation
        "198.18.0.1",  # benchmarking
        "224.0.0.1",  # multicast
        "239.255.255.250",
        "240.0.0.1",  # reserved
        "255.255.255.255",  # broadcast
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",  # AWS metadata over IPv6
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "::ffff:0:10.0.0.1",  # IPv4-translated
        "::127.0.0.1",  # IPv4-compatible
        "::10.0.0.1",
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",
        "64:ff9b:1::1",  # local-use NAT64
        "2001::1",  # Teredo
    ],
)
def test_non_public_addresses(address):
    assert is_public_address(ipaddress.ip_address(address)) is False


@pytest.mark.parametrize(
    "address, embedded",
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:0:10.1.2.3", "10.1.2.3"),
        ("::10.1.2.3", "10.1.2.3"),
        ("2002:c0a8:101::", "192.168.1.1"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("2606:4700::1", None),
        ("::1", None),
        ("::", None),
    ],
)
def test_embedded_ipv4(address, embedded):
    result = embedded_ipv4(ipaddress.IPv6Address(address))
    assert result == (ipaddress.IPv4Address(embedded) if embedded else None)


@pytest.mark.parametrize(
    "host, expected",
    [
        ("example.org", True),
        ("cdn.example.org", True),
        ("a.b.example.org", True),
        ("example.org.evil.test", False),
        ("notexample.org", False),
        ("org", False),
    ],
)
def test_domain_allowed_is_a_label_suffix_match(host, expected):
    assert domain_allowed(host, ["example.org"]) is expected


def check(url: str, kind: MediaKind = IMAGE, **policy) -> str:
    return check_url(URL(url), FetchPolicy(**policy), "p", kind)


@pytest.mark.parametrize(
    "url, host",
    [
        ("http://Example.COM/a.png", "example.com"),
        ("https://example.com./a.png", "example.com"),
        ("https://bücher.example/a.png", "xn--bcher-kva.example"),  # IDNA, as DNS sees it
        ("http://8.8.8.8:8080/x", "8.8.8.8"),
        ("http://[2606:4700::1]/x", "2606:4700::1"),
        ("http://1.example/x", "1.example"),  # a digit label is fine when the last is a name
    ],
)
def test_check_url_passes_public_hosts(url, host):
    assert check(url) == host


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/a.png",
        "HTTP://user@example.com/",
        "http://:pw@example.com/",
        "http://127.0.0.1/",
        "http://localhost/",
        "http://a.b.localhost/",
        "http://2130706433/",
        "http://0x7F000001/",
        "http://127.1/",
        "http://example.0x10/",
        "http://exa%6dple.com/",
        "http://[::ffff:7f00:1]/",
    ],
)
@pytest.mark.parametrize("kind", [IMAGE, VIDEO], ids=lambda kind: kind.name)
def test_check_url_refuses(url, kind):
    with pytest.raises(APIError) as caught:
        check(url, kind)
    assert (caught.value.status, caught.value.code, caught.value.param) == (
        400,
        f"{kind.name}_url_forbidden",
        "p",
    )
    assert f"The {kind.name} URL" in caught.value.message


def test_private_allowance_names_hosts_exactly():
    assert check("http://127.0.0.1:9/x", allow_private_hosts=("127.0.0.1",)) == "127.0.0.1"
    assert check("http://LocalHost/x", allow_private_hosts=("localhost",)) == "localhost"
    with pytest.raises(APIError):
        check("http://127.0.0.2/x", allow_private_hosts=("127.0.0.1",))
    with pytest.raises(APIError):  # the allowance never lifts the scheme or credential rules
        check("http://u:p@127.0.0.1/x", allow_private_hosts=("127.0.0.1",))


def test_each_kind_reads_its_own_limits():
    limits = RequestLimits(max_images=1, max_image_bytes=2, max_videos=3, max_video_bytes=4)
    policy = FetchPolicy(max_bytes=5, timeout_s=6.0, video_max_bytes=7, video_timeout_s=8.0)
    read = [
        (kind.max_parts(limits), kind.max_bytes(limits))
        + (kind.fetch_max_bytes(policy), kind.fetch_timeout_s(policy))
        for kind in (IMAGE, VIDEO)
    ]
    assert read == [(1, 2, 5, 6.0), (3, 4, 7, 8.0)]
