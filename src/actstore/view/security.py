"""Who may ask the viewer what: the Host, Origin and token rules, as plain functions.

>>> p = Policy.for_bind("127.0.0.1", 8765, token="t0k")
>>> p.host_ok("127.0.0.1:8765"), p.host_ok("localhost:8765"), p.host_ok("evil.example:8765")
(True, True, False)
>>> p.origin_ok("http://127.0.0.1:8765", "127.0.0.1:8765"), p.origin_ok("http://evil.example", "127.0.0.1:8765")
(True, False)

The model (see the README's "Exploring a run in the browser"):

* The server listens on loopback unless ``--host`` names another address. Then every
  request must carry the access token (``Policy.token``, random per start unless given):
  in the ``token`` query parameter of the printed URL, the cookie the page then gets,
  or the ``X-Actstore-Token`` header.
* The ``Host`` header must name this server: its port, and ``localhost``, a loopback IP
  (or, off loopback, any IP literal, this machine's names or the ``--host`` name). A
  web page whose own name resolves to 127.0.0.1 (DNS rebinding) sends its own name and
  is refused, so it cannot read the store through the victim's browser.
* ``Origin``, when a browser sends one, must be this server itself; ``Sec-Fetch-Site``,
  when sent, must be ``same-origin`` or ``none`` (typed or bookmarked), except for the
  page itself opened by a link (a navigation: nothing is read but the page).
* A POST (what loads a model, writes a file or starts a job) needs the token in the
  ``X-Actstore-Token`` header even on loopback: a cookie alone would let another page of
  the same site (any port of localhost) post with it.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

TOKEN_HEADER = "x-actstore-token"


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """``"name:8765"`` -> ("name", 8765); ``"[::1]:80"`` -> ("::1", 80); None when
    malformed."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        if value.count(":") > 1:  # an IPv6 literal must be bracketed in a Host header
            return None
        name, _, port_text = value.partition(":")
    if not name:
        return None
    if not port_text:
        return name, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


def _machine_names() -> set[str]:
    names = set()
    for get in (socket.gethostname, socket.getfqdn):
        try:
            names.add(get().lower())
        except OSError:
            pass
    return {n for n in names if n}


@dataclass(frozen=True)
class Policy:
    """The rules of one running server (see the module docstring)."""

    port: int
    loopback: bool  # bound to loopback: a GET needs no token
    token: str
    names: frozenset[str]  # host names accepted besides IP literals

    @classmethod
    def for_bind(cls, host: str, port: int, token: str | None = None) -> Policy:
        loop = is_loopback(host)
        names = {"localhost"}
        if not loop:
            names |= _machine_names()
            name = host.strip("[]").lower()
            if name not in ("", "0.0.0.0", "::"):
                names.add(name)
        return cls(port, loop, token or secrets.token_urlsafe(24), frozenset(names))

    @property
    def cookie(self) -> str:
        """The token cookie's name: one per port (cookies ignore ports, so two viewers on
        one machine would otherwise overwrite each other's)."""
        return f"actstore_view_{self.port}"

    def name_ok(self, name: str) -> bool:
        if name in self.names:
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        return ip.is_loopback or not self.loopback

    def host_ok(self, host: str | None) -> bool:
        """The ``Host`` header names this server (see the module docstring)."""
        parsed = split_host(host or "")
        if parsed is None:
            return False
        name, port = parsed
        return (port or 80) == self.port and self.name_ok(name)

    def origin_ok(self, origin: str | None, host: str | None) -> bool:
        """No ``Origin`` (not a cross-origin browser request), or this server's own."""
        if origin is None:
            return True
        parts = urlsplit(origin.strip())
        if parts.scheme != "http" or parts.path not in ("", "/") or parts.query or not parts.netloc:
            return False  # "null" (a sandboxed or file:// page) included
        return parts.netloc.lower() == (host or "").strip().lower() and self.host_ok(parts.netloc)

    def token_matches(self, candidate: str) -> bool:
        return secrets.compare_digest(candidate.encode(), self.token.encode())

    def supplied_tokens(self, query: str, headers: dict[str, str]) -> tuple[str | None, str | None, str | None]:
        """The tokens a request carries: (header, query parameter, cookie), None if absent."""
        header = headers.get(TOKEN_HEADER)
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if header is None and scheme.lower() in ("token", "bearer") and value:
            header = value.strip()
        values = parse_qs(query, keep_blank_values=True).get("token")
        cookie = None
        if "cookie" in headers:
            try:
                jar = SimpleCookie(headers["cookie"])
            except CookieError:
                jar = SimpleCookie()
            if self.cookie in jar:
                cookie = jar[self.cookie].value
        return header, values[-1] if values else None, cookie

    def check(self, method: str, path: str, query: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """None when the request may go on, else (status, one-line reason). A wrong
        token typed or sent is refused; a stale cookie (from an earlier start of the
        viewer on this port) counts as no token."""
        host = headers.get("host")
        if not self.host_ok(host):
            return 403, "this server answers only requests addressed to it (Host header refused)"
        site = headers.get("sec-fetch-site")
        navigation = headers.get("sec-fetch-mode") == "navigate" and method == "GET" and path in ("/", "/index.html")
        if site is not None and site not in ("same-origin", "none") and not navigation:
            return 403, f"cross-site request refused ({site})"
        if not self.origin_ok(headers.get("origin"), host):
            return 403, "cross-origin request refused (Origin is not this server)"
        header, query_token, cookie = self.supplied_tokens(query, headers)
        if any(t is not None and not self.token_matches(t) for t in (header, query_token)):
            return 403, "wrong access token: open the address actstore view printed"
        if method == "POST" and header is None:
            return 401, f"a POST needs the access token in the {TOKEN_HEADER} header"
        if not self.loopback and not self.authenticated(query, headers):
            return 401, "this viewer needs its access token: open the address actstore view printed (...?token=...)"
        return None

    def authenticated(self, query: str, headers: dict[str, str]) -> bool:
        """The request carries the right token, in any of the three places."""
        return any(t is not None and self.token_matches(t) for t in self.supplied_tokens(query, headers))
