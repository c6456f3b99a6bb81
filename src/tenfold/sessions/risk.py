"""Risk signals: how a validating request differs from the device the session was created on.

The session keeps only keyed hashes of the device's network and fingerprint (and a country
code when a GeoIP database is configured), so a validation compares without the store holding
either in clear. No I/O here.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress

IPV4_PREFIX = 24
IPV6_PREFIX = 48


@functools.lru_cache(maxsize=4096)
def network(ip: str) -> str | None:
    """The address's network (/24 for IPv4, /48 for IPv6), or None if it is not an address."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def keyed(key: bytes, kind: str, value: str) -> str:
    """A keyed hash of a device attribute ('' for none): comparable, not reversible."""
    if not value:
        return ""
    return hmac.new(key, kind.encode() + b"\x00" + value.encode(), hashlib.sha256).hexdigest()[:32]


def signals(
    *,
    stored_network: str,
    stored_fingerprint: str,
    stored_country: str,
    network_hash: str,
    fingerprint_hash: str,
    country: str,
) -> tuple[str, ...]:
    """Which attributes changed; an attribute the request does not present is not compared."""
    found = []
    if network_hash and stored_network and not hmac.compare_digest(network_hash, stored_network):
        found.append("network_changed")
    if country and stored_country and country != stored_country:
        found.append("country_changed")
    if (
        fingerprint_hash
        and stored_fingerprint
        and not hmac.compare_digest(fingerprint_hash, stored_fingerprint)
    ):
        found.append("fingerprint_changed")
    return tuple(found)
