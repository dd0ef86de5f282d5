"""The egress allow-list: which hosts external endpoints may send requests (and keys) to.

Why: an endpoint config names a base URL, and the server then sends requests there, with the
endpoint's provider key. Operators who run ``sqlinfer serve`` for a team can limit those URLs with
``SQLINFER_EGRESS_ALLOW``: a comma-separated list of host names (``api.openai.com``), domain
suffixes (``.openai.azure.com`` matches every host under it) and IP networks in CIDR form
(``10.0.0.0/8``, ``127.0.0.1/32``). Networks match only URLs whose host is an IP address: a host
name is never resolved to decide, because the answer could change between the check and the call.
Unset, every URL is allowed (the single-user default). The list is checked when a config is
created or updated and again before every call, so narrowing it takes effect at once.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from serving.errors import InvalidParameterValue, PermissionDenied

VARIABLE = "SQLINFER_EGRESS_ALLOW"


@dataclass(frozen=True)
class EgressPolicy:
    hosts: frozenset[str]
    suffixes: tuple[str, ...]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    text: str

    @classmethod
    def from_env(cls) -> "EgressPolicy | None":
        text = os.environ.get(VARIABLE, "").strip()
        if not text:
            return None
        hosts, suffixes, networks = set(), [], []
        for item in filter(None, (part.strip().lower() for part in text.split(","))):
            if item.startswith("."):
                suffixes.append(item)
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item)
        return cls(frozenset(hosts), tuple(suffixes), tuple(networks), text)

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return host in self.hosts or any(host.endswith(suffix) for suffix in self.suffixes)
        return any(address in network for network in self.networks) or host in self.hosts


def check_url(url: str, field: str) -> None:
    """Refuse ``url`` (a config's ``field``) when the allow-list is set and does not cover its host."""
    policy = EgressPolicy.from_env()
    if policy is None:
        return
    host = urlsplit(url).hostname
    if not host:
        raise InvalidParameterValue(f"{field} = {url!r} has no host; give a URL such as https://api.openai.com/v1")
    if not policy.allows(host):
        raise PermissionDenied(
            f"{field} = {url!r}: host {host!r} is not in this server's egress allow-list ({VARIABLE}={policy.text}); "
            f"use an allowed host or ask the operator to add it")
