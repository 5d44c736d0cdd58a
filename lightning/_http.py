"""HTTP request screening shared by the policy server and the OTLP receiver.

Plain functions of headers and hosts (no starlette import), so both listeners apply the
same rules: a key beyond loopback, no cross-origin browser writes, JSON only as JSON.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from ._errors import ConfigError

__all__ = ["cross_origin", "is_json", "is_loopback", "require_key"]


def require_key(host: str, api_key: str | None, what: str) -> None:
    """Refuse to listen beyond loopback without a key (anyone who can reach the port
    could read the policy and write training data).

    Raises:
        ConfigError: ``host`` is not a loopback address and ``api_key`` is empty.
    """
    if api_key or is_loopback(host):
        return
    raise ConfigError(f"refusing to serve {what} on {host!r} without an API key: it is "
                      "reachable from other machines; pass --api-key (api_key=...)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cross_origin(request: Any) -> str | None:
    """Why a browser request from another origin is refused, or None.

    Browsers send ``Origin`` (and ``Sec-Fetch-Site``) with cross-origin requests, and a
    ``text/plain`` POST needs no CORS preflight: without this check any web page the
    user opens could write training data through a loopback server. Clients that are
    not browsers send no ``Origin``; a same-origin page may call the server.
    """
    if request.headers.get("sec-fetch-site") == "cross-site":
        return "cross-site browser requests are refused"
    origin = request.headers.get("origin")
    if origin is None:
        return None
    host = request.headers.get("host", "")
    if origin != "null" and urlsplit(origin).netloc.lower() == host.lower():
        return None
    return (f"requests from origin {origin!r} are refused: this server takes requests from "
            "programs and same-origin pages only")


def is_json(content_type: str | None) -> bool:
    mt = (content_type or "").split(";", 1)[0].strip().lower()
    return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))
