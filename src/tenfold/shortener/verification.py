"""Branded-domain ownership: the ways a domain proves it holds its verification token.

Each method is a `Verifier` (see `tenfold.shortener.service`): `async verify(domain, token) ->
bool`. A method that cannot reach its evidence (timeout, NXDOMAIN, refused, a bad answer)
answers False and logs one line; it never raises to the caller.

- `http_verifier`: the token is the body of a GET of a well-known URL of the domain.
- `dns_txt_verifier`: a TXT record `_tenfold-verification.<domain>` holds
  `tenfold-verification=<token>`.
- `any_verifier`: the domain is verified when any of the given methods proves it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from ipaddress import ip_address

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import httpx
import structlog

from tenfold.shortener.service import Verifier

log = structlog.get_logger(__name__)

METHODS = ("http", "dns")
TXT_LABEL = "_tenfold-verification"
TXT_PREFIX = "tenfold-verification="
MAX_HTTP_BODY = 1_024


def txt_name(domain: str) -> str:
    """The name whose TXT record proves ownership of `domain`."""
    return f"{TXT_LABEL}.{domain.rstrip('.')}"


def txt_value(token: str) -> str:
    """The TXT value to publish for `token`."""
    return f"{TXT_PREFIX}{token}"


def http_verifier(template: str, timeout: float = 5.0) -> Verifier:
    """Ownership by a token served at a well-known URL of the domain.

    `template` is the URL with `{domain}` in it. The GET follows no redirect, must answer 200
    with at most 1 KiB, and the body, stripped of surrounding whitespace, must be the token.
    """

    async def verify(domain: str, token: str) -> bool:
        url = template.format(domain=domain)
        try:
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        return False
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_HTTP_BODY:
                            return False
        except httpx.HTTPError as exc:
            log.info("shortener.domain_verify_failed", method="http", domain=domain, error=str(exc))
            return False
        return body.decode("utf-8", "replace").strip() == token

    return verify


def parse_nameserver(entry: str, port: int = 53) -> tuple[str, int]:
    """`1.2.3.4`, `1.2.3.4:5353`, `::1` or `[::1]:5353` as (address, port)."""
    text = entry.strip()
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"not a nameserver address: {entry!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        address, _, number = text.partition(":")
        port = int(number)
    else:
        address = text
    ip_address(address)  # a nameserver is an IP address, never a name to resolve first
    if not 0 < port < 65_536:
        raise ValueError(f"not a port: {port} in {entry!r}")
    return address, port


def dns_txt_verifier(
    nameservers: Sequence[str] | None = None, port: int = 53, timeout: float = 3.0
) -> Verifier:
    """Ownership by a TXT record `_tenfold-verification.<domain>` whose value is
    `tenfold-verification=<token>` (exactly that; other TXT records at the name are ignored,
    and the strings of one record are joined, as RFC 7208 does).

    `nameservers` are IP addresses, each optionally with its own port (`1.2.3.4:5353`,
    `[::1]:5353`; else `port`); None or empty asks the system's resolvers (resolv.conf).
    `timeout` bounds the whole lookup. dnspython's resolver retries a truncated UDP answer
    over TCP.
    """
    servers = [parse_nameserver(entry, port) for entry in nameservers or ()]

    def resolver() -> dns.asyncresolver.Resolver:
        if not servers:
            return dns.asyncresolver.Resolver(configure=True)
        made = dns.asyncresolver.Resolver(configure=False)
        made.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in servers]
        return made

    async def verify(domain: str, token: str) -> bool:
        name = txt_name(domain)
        expected = txt_value(token).encode()
        try:
            qname = dns.name.from_text(name)
            answer = await resolver().resolve(
                qname, dns.rdatatype.TXT, lifetime=timeout, search=False
            )
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.info("shortener.domain_verify_failed", method="dns", domain=domain, error=error)
            return False
        for rdata in answer:
            if b"".join(rdata.strings).strip() == expected:
                return True
        log.info(
            "shortener.domain_verify_failed",
            method="dns",
            domain=domain,
            error=f"no TXT record at {name} holds the token",
        )
        return False

    return verify


def any_verifier(*verifiers: Verifier) -> Verifier:
    """Ownership proven by any of `verifiers`; they run together, the first proof wins and the
    others are cancelled. One that raises counts as a failure."""

    async def verify(domain: str, token: str) -> bool:
        if not verifiers:
            return False
        tasks = [asyncio.ensure_future(v(domain, token)) for v in verifiers]
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    if await next_done:
                        return True
                except Exception as exc:
                    log.warning(
                        "shortener.domain_verify_error",
                        domain=domain,
                        error=f"{type(exc).__name__}: {exc}",
                    )
            return False
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return verify


def verifier_from(
    methods: Sequence[str],
    url_template: str,
    nameservers: Sequence[str] | None = None,
    *,
    http_timeout: float = 5.0,
    dns_timeout: float = 3.0,
) -> Verifier | None:
    """The verifier for the configured `methods` ("http", "dns"); None when there is none."""
    chosen: list[Verifier] = []
    for method in dict.fromkeys(m.strip().lower() for m in methods if m.strip()):
        if method == "http":
            chosen.append(http_verifier(url_template, http_timeout))
        elif method == "dns":
            chosen.append(dns_txt_verifier(nameservers, timeout=dns_timeout))
        else:
            raise ValueError(f"unknown domain verification method {method!r}; use {METHODS}")
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else any_verifier(*chosen)
