"""The names a service certificate covers: DNS names and IP addresses."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from trekeys.errors import HostnameError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class SubjectNames:
    """The DNS names and IP addresses that a service certificate covers."""

    dns_names: list[str] = field(default_factory=list)
    ip_addresses: list[IPAddress] = field(default_factory=list)

    def as_strings(self) -> list[str]:
        """Return every name as text, DNS names first."""
        return self.dns_names + [str(ip) for ip in self.ip_addresses]


def parse_subject_names(names: Sequence[str]) -> SubjectNames:
    """Sort names into DNS names and IP addresses, checking each one.

    DNS names follow the letter-digit-hyphen rule of RFC 1123: labels of 1 to
    63 characters, and at most 253 characters in all. The last label must not be
    all digits (RFC 3696 section 2), so a mistyped IP address is not taken for a
    name.
    Names are lower-cased and duplicates removed.

    Raises:
        HostnameError: no names were given, or one is not a valid DNS name or IP.
    """
    if not names:
        raise HostnameError(
            "a certificate needs at least one DNS name or IP address; give the "
            "service's name."
        )

    dns_names: list[str] = []
    ip_addresses: list[IPAddress] = []
    for raw in names:
        text = raw.strip()
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            name = _check_dns_name(raw)
            if name not in dns_names:
                dns_names.append(name)
            continue
        if address not in ip_addresses:
            ip_addresses.append(address)
    return SubjectNames(dns_names, ip_addresses)


def _check_dns_name(raw: str) -> str:
    name = raw.strip().lower().removesuffix(".")
    labels = name.split(".")
    valid = (
        0 < len(name) <= 253
        and all(_LABEL.match(label) for label in labels)
        and not labels[-1].isdigit()
    )
    if not valid:
        raise HostnameError(
            f"{raw!r} is not a valid DNS name or IP address; use letters, digits "
            "and hyphens in dot-separated labels (IDN names in their xn-- form), "
            "or an IPv4 or IPv6 address."
        )
    return name
