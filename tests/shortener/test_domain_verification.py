"""Branded-domain ownership by DNS TXT record (and HTTP), against real local servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, TXT, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tenfold.kernel.clock import ManualClock
from tenfold.settings import Settings
from tenfold.shortener.verification import (
    any_verifier,
    dns_txt_verifier,
    http_verifier,
    parse_nameserver,
    txt_name,
    txt_value,
    verifier_from,
)
from tests.conftest import make_settings, serve_app

TOKEN = "s3cr3t-token_ABCdef0123456789xyzw"


@dataclass
class Zone(BaseResolver):  # type: ignore[misc]
    """TXT records by name; answers REFUSED for `refused`, truncates `big` answers over UDP."""

    records: dict[str, list[list[bytes]]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    big: set[str] = field(default_factory=set)
    protocols: list[str] = field(default_factory=list)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        name = str(request.q.qname).rstrip(".").lower()
        self.protocols.append(handler.protocol)
        reply = request.reply()
        if name in self.refused:
            reply.header.rcode = RCODE.REFUSED
            return reply
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if name in self.big and handler.protocol == "udp":
            reply.header.tc = 1  # too big for UDP: ask again over TCP
            return reply
        if request.q.qtype == QTYPE.TXT:
            for strings in self.records[name]:
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(strings), ttl=60))
        return reply


@dataclass
class Dns:
    zone: Zone
    port: int

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def dns() -> Iterator[Dns]:
    """A real DNS server on 127.0.0.1, UDP and TCP on the same free port."""
    zone = Zone()
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    for _ in range(20):
        udp = DNSServer(zone, address="127.0.0.1", port=0, logger=quiet)
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(zone, address="127.0.0.1", port=port, tcp=True, logger=quiet)
        except OSError:
            udp.server.server_close()
            continue
        break
    else:
        pytest.fail("no free port for UDP and TCP at once")
    servers = (udp, tcp)
    for server in servers:
        loop = server.server.serve_forever
        threading.Thread(target=loop, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield Dns(zone, port)
    finally:
        for server in servers:
            server.server.shutdown()
            server.server.server_close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port that takes queries and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def closed_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def publish(dns: Dns, domain: str, *values: str | list[str]) -> None:
    dns.zone.records[txt_name(domain)] = [
        [v.encode()] if isinstance(v, str) else [s.encode() for s in v] for v in values
    ]


def test_the_record_to_publish() -> None:
    assert txt_name("Go.brand.example.") == "_tenfold-verification.Go.brand.example"
    assert txt_value(TOKEN) == f"tenfold-verification={TOKEN}"


async def test_the_right_token_verifies(dns: Dns) -> None:
    publish(dns, "brand.example", "v=spf1 -all", txt_value(TOKEN))
    verify = dns_txt_verifier([dns.nameserver], timeout=2.0)
    assert await verify("brand.example", TOKEN) is True
    # The port may come apart from the address too.
    assert await dns_txt_verifier(["127.0.0.1"], port=dns.port)("brand.example", TOKEN) is True


async def test_a_record_split_in_strings_is_joined(dns: Dns) -> None:
    value = txt_value(TOKEN)
    publish(dns, "split.example", [value[:10], value[10:]])
    assert await dns_txt_verifier([dns.nameserver])("split.example", TOKEN) is True


async def test_a_wrong_token_or_the_bare_token_does_not(dns: Dns) -> None:
    publish(dns, "brand.example", txt_value("another-token"), TOKEN)
    verify = dns_txt_verifier([dns.nameserver])
    assert await verify("brand.example", TOKEN) is False
    assert await verify("brand.example", "") is False


async def test_nxdomain_is_false(dns: Dns) -> None:
    assert await dns_txt_verifier([dns.nameserver])("nobody.example", TOKEN) is False
    assert dns.zone.protocols == ["udp"]


async def test_a_refusing_server_is_false(dns: Dns) -> None:
    dns.zone.refused.add(txt_name("refused.example"))
    assert await dns_txt_verifier([dns.nameserver])("refused.example", TOKEN) is False


async def test_a_truncated_answer_is_asked_again_over_tcp(dns: Dns) -> None:
    many = [txt_value(f"filler-{i:03}-" + "x" * 40) for i in range(30)]
    publish(dns, "big.example", *many, txt_value(TOKEN))
    dns.zone.big.add(txt_name("big.example"))
    assert await dns_txt_verifier([dns.nameserver])("big.example", TOKEN) is True
    assert dns.zone.protocols == ["udp", "tcp"]


async def test_no_answer_times_out_as_false(silent_port: int) -> None:
    verify = dns_txt_verifier([f"127.0.0.1:{silent_port}"], timeout=0.3)
    started = time.monotonic()
    assert await verify("brand.example", TOKEN) is False
    assert time.monotonic() - started < 2.0


async def test_nothing_listening_is_false() -> None:
    verify = dns_txt_verifier([f"127.0.0.1:{closed_port()}"], timeout=0.5)
    assert await verify("brand.example", TOKEN) is False


async def test_a_name_dns_cannot_carry_is_false(dns: Dns) -> None:
    verify = dns_txt_verifier([dns.nameserver])
    assert await verify("a" * 64 + ".example", TOKEN) is False


def test_nameserver_entries() -> None:
    assert parse_nameserver("1.2.3.4") == ("1.2.3.4", 53)
    assert parse_nameserver("1.2.3.4:5353") == ("1.2.3.4", 5353)
    assert parse_nameserver("::1", 5300) == ("::1", 5300)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    for bad in ("dns.example", "1.2.3.4:0", "[::1]x", "1.2.3.4:port"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


async def test_any_method_proves_it(dns: Dns, token_server: tuple[str, dict[str, str]]) -> None:
    template, tokens = token_server
    http = http_verifier(template, timeout=2.0)
    txt = dns_txt_verifier([dns.nameserver], timeout=2.0)
    either = any_verifier(http, txt)
    assert await http("brand.example", TOKEN) is False  # HTTP fails ...
    publish(dns, "brand.example", txt_value(TOKEN))
    assert await either("brand.example", TOKEN) is True  # ... DNS passes
    tokens["web.example"] = TOKEN
    assert await either("web.example", TOKEN) is True  # and the other way round
    assert await either("neither.example", TOKEN) is False
    assert await any_verifier()("brand.example", TOKEN) is False


async def test_any_verifier_takes_a_raising_method_as_a_failure() -> None:
    async def broken(domain: str, token: str) -> bool:
        raise RuntimeError("boom")

    async def yes(domain: str, token: str) -> bool:
        return True

    assert await any_verifier(broken)("brand.example", TOKEN) is False
    assert await any_verifier(broken, yes)("brand.example", TOKEN) is True


async def test_http_failing_to_connect_is_false() -> None:
    verify = http_verifier(f"http://127.0.0.1:{closed_port()}/{{domain}}", timeout=1.0)
    assert await verify("brand.example", TOKEN) is False


def test_the_configured_methods() -> None:
    assert verifier_from([], "https://{domain}/") is None
    assert verifier_from(["dns"], "https://{domain}/") is not None
    with pytest.raises(ValueError, match="smtp"):
        verifier_from(["http", "smtp"], "https://{domain}/")


# --- end to end ------------------------------------------------------------------------------


def settings_of(**values: Any) -> Settings:
    return make_settings(**values)


async def test_branded_domain_verified_by_dns_only(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any, dns: Dns
) -> None:
    settings = settings_of(
        **stack,
        services=["shortener"],
        shortener_analytics=False,
        shortener_domain_verify_methods=["dns"],
        shortener_dns_nameservers=[dns.nameserver],
    )
    async with serve_app(settings, clock) as (_app, client):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        r = await client.post(
            "/api/v1/domains", json={"domain": "Go.Brand.example"}, headers=headers
        )
        assert r.status_code == 201, r.text
        body = r.json()
        token = body["verification_token"]
        assert body["verified"] is False and token
        assert body["verification_url"] is None  # HTTP is not a method here
        assert body["verification"] == {
            "http": None,
            "dns": {
                "name": "_tenfold-verification.go.brand.example",
                "type": "TXT",
                "value": f"tenfold-verification={token}",
            },
        }
        # Not published yet: NXDOMAIN, 409 naming the record.
        r = await client.post("/api/v1/domains/go.brand.example/verify", headers=headers)
        assert r.status_code == 409
        assert "_tenfold-verification.go.brand.example" in r.json()["detail"]
        r = await client.post(
            "/api/v1/urls",
            json={"url": "https://example.com/a", "domain": "go.brand.example"},
            headers=headers,
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "domain"
        publish(dns, "go.brand.example", body["verification"]["dns"]["value"])
        r = await client.post("/api/v1/domains/go.brand.example/verify", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["verified"] is True and r.json()["verification"] is None
        r = await client.post(
            "/api/v1/urls",
            json={
                "url": "https://example.com/a",
                "domain": "go.brand.example",
                "custom_alias": "promo",
            },
            headers=headers,
        )
        assert r.status_code == 201, r.text
        assert r.json()["short_url"] == "http://go.brand.example/promo"
        branded = await client.get("/promo", headers={"host": "go.brand.example"})
        assert branded.status_code == 302 and branded.headers["location"] == "https://example.com/a"


async def test_the_default_methods_show_both_proofs(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(**stack, services=["shortener"], shortener_analytics=False)
    async with serve_app(settings, clock) as (_app, client):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        r = await client.post("/api/v1/domains", json={"domain": "brand.example"}, headers=headers)
        assert r.status_code == 201, r.text
        body = r.json()
        token = body["verification_token"]
        url = "https://brand.example/.well-known/tenfold-domain-verification"
        assert body["verification_url"] == url
        assert body["verification"]["http"] == {"url": url, "body": token}
        assert body["verification"]["dns"]["value"] == f"tenfold-verification={token}"
