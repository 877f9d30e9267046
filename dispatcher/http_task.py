"""An ``http`` task's call, as the HTTP_REQUEST activity makes it: safe by default.

- **No secret in history.** The task's config is read here, from the worker's current snapshot,
  with its ``${VAR}`` references as written; they become markers, the templates are rendered
  against the run's context, and only then are the environment's values put in
  (:mod:`bridge.envvars`). A ``${...}`` a payload brings in is text, never looked up.
- **No request where it should not go.** Template values in the URL are percent-encoded
  (:func:`bridge.templates.render_url`). With ``runner.allow_hosts`` only those hosts are called;
  without it every address the host resolves to must be public (no loopback, private, link-local,
  multicast or reserved address), and the connection goes to the address that was checked, so a
  second DNS answer cannot redirect it. Redirects are not followed; proxies from the environment
  are used only with ``allow_hosts``.
- **Bounded.** ``runner.max_response_bytes`` (read as a stream, decoded) and
  ``runner.timeout_seconds`` (or the task's lower one) for the whole call.
- **Quiet failures.** A failure names the task and its configured URL with userinfo and query
  redacted, and masks every substituted value; refusals and a ``4xx`` are not retried.

The settings are described in docs/configuration.md, "runner".
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import socket
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from temporalio.exceptions import ApplicationError

from bridge import templates
from bridge.config import BridgeConfig, HttpTask, RunnerConfig
from bridge.envvars import Substitution, defer
from bridge.errors import ConfigError
from dispatcher.contract import HttpCall

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
_METHOD = re.compile(r"^[A-Z]+$")


def redact_url(url: str) -> str:
    """``url`` without its userinfo, query and fragment (each replaced by ``***`` when present)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that does not parse>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address
_REFUSED_V6 = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # RFC 8215 local-use NAT64: whatever the site maps it to
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated): ::7f00:1 is 127.0.0.1 on some stacks
    ipaddress.IPv6Network("2001::/32"),  # Teredo: an IPv4 server and client inside
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (RFC 2765): a SIIT gateway maps it to the IPv4 one
    ipaddress.IPv6Network("fec0::/10"),  # site-local (deprecated, RFC 3879): the old private range
)


def is_public(ip: IP) -> bool:
    """Globally routable unicast: not loopback, private, link-local, shared, multicast or reserved.
    An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64) is judged by the IPv4 address:
    on a network with a NAT64 gateway, ``64:ff9b::a00:5`` reaches 10.0.0.5."""
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _REFUSED_V6):
            return False
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Refused(Exception):
    """A call the task runner will not make, whatever a retry changes."""


@dataclass
class Request:
    method: str
    url: httpx.URL
    headers: dict[str, str]
    body: dict[str, Any]  # httpx keyword: json= or content=
    extensions: dict[str, Any] = field(default_factory=dict)


def find_task(config: BridgeConfig, workflow_id: str, task_id: str) -> HttpTask:
    for wf in config.workflows:
        if wf.id == workflow_id:
            for task in wf.tasks:
                if task.id == task_id and isinstance(task, HttpTask):
                    return task
    raise ApplicationError(
        f"workflow {workflow_id!r} has no http task {task_id!r} in the worker's config (was it reloaded?)",
        type="TaskMissing",
        non_retryable=True,
    )


def prepare(task: HttpTask, context: dict[str, Any], env: Mapping[str, str]) -> tuple[Request, Substitution]:
    """Render the task against ``context``, then substitute the environment (see the module doc)."""
    cfg = task.config
    marked, sub = defer({"url": cfg.url, "method": cfg.method, "headers": cfg.headers, "body": cfg.body}, env)
    cached = not sub.values  # marked text is new each call (a token of its own): compiled, not kept
    try:
        rendered_url = templates.render_url(marked["url"], context, cached=cached)
        rendered_headers = {str(k): templates.render(v, context, cached=cached) for k, v in marked["headers"].items()}
        rendered_body = templates.render(marked["body"], context, cached=cached)
    except templates.TemplateError as exc:
        raise Refused(sub.scrub(str(exc))) from None
    url_text, header_texts, body = (sub.restore(x) for x in (rendered_url, rendered_headers, rendered_body))
    method = str(sub.restore(marked["method"])).upper()
    if sub.found_in([url_text, header_texts, body, method]):  # a marker a filter changed: restore missed it
        raise Refused(
            "a template changed a ${VAR} before its value was put in (a filter such as urlencode on it): "
            "not sent; apply filters to the payload's values, not to the environment's"
        )
    try:
        url = httpx.URL(url_text)
    except (httpx.InvalidURL, ValueError) as exc:  # ValueError: an IDNA label that does not encode
        raise Refused(sub.scrub(str(exc))) from None
    headers = {k: _header(v) for k, v in header_texts.items()}
    if not _METHOD.match(method):
        raise Refused(f"method {method[:20]!r} is not an HTTP method")
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise Refused("the URL must be http:// or https:// with a host")
    if body is None:
        kwargs: dict[str, Any] = {}
    elif isinstance(body, dict | list):
        kwargs = {"json": body}
    else:
        kwargs = {"content": str(body)}
    return Request(method, url, headers, kwargs), sub


_FIELD_VALUE = re.compile(r"(?:[!-~]+(?:[ \t]+[!-~]+)*)?")
"""A header value h11 sends: visible characters, spaces and tabs between them (RFC 9110, 5.5)."""


def _header(value: Any) -> str:
    """A header value as rendered, refused without quoting it: h11's own refusal quoted the value
    escaped (a secret in it with a quote or a backslash was no longer masked) and was retried."""
    text = "" if value is None else str(value)
    if "\r" in text or "\n" in text or "\x00" in text:
        raise Refused("a header value would hold a line break")
    if not text.isascii():  # httpx sends header values as ASCII: UnicodeEncodeError, retried each time
        raise Refused("a header value holds characters that are not ASCII (percent-encode them in the template)")
    if not _FIELD_VALUE.fullmatch(text):
        raise Refused("a header value begins or ends with a space, or holds a control character")
    return text


async def route(
    req: Request, runner: RunnerConfig, resolver: Resolver = resolve, public: Callable[[IP], bool] = is_public
) -> bool:
    """Check where ``req`` goes; pin it to the checked address unless allow_hosts named the host.

    Returns whether proxies from the environment may be used (only with allow_hosts).
    """
    host = req.url.raw_host.decode("ascii", errors="replace").rstrip(".").lower()  # an IDN's A-labels
    port = req.url.port or (443 if req.url.scheme == "https" else 80)
    allowed = runner.allowed
    if allowed is not None:
        name = _canonical(host)
        if not any(h == name and p in (None, port) for h, p in allowed):
            raise Refused(f"host {host}:{port} is not in runner.allow_hosts")
        return True
    try:
        addresses = await resolver(host, port)
    except OSError as exc:
        raise ApplicationError(f"cannot resolve the host: {exc.strerror or exc}", type="Resolve") from None
    ips = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses]
    if not ips or not all(public(ip) for ip in ips):
        raise Refused(
            f"host {host} resolves to a loopback, private, link-local or reserved address; "
            "list it in runner.allow_hosts to call it"
        )
    pinned = str(ips[0])
    if pinned != host:
        req.headers = {k: v for k, v in req.headers.items() if k.lower() != "host"}
        req.headers["Host"] = host if req.url.port is None else f"{host}:{req.url.port}"
        if req.url.scheme == "https":
            req.extensions["sni_hostname"] = host
        req.url = req.url.copy_with(host=pinned)
    return False


def _canonical(host: str) -> str:
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


ACCEPT_ENCODING = "gzip, deflate"
"""What a call accepts (unless its task sets ``Accept-Encoding``): the codings :class:`_Decoded` reads."""


class _Decoded:
    """An answer's body decoded as it comes, never past ``cap`` bytes. httpx decodes each chunk
    whole, every coding the answer names, before anyone sees it: 3 KB sent as ``gzip, gzip`` made
    2 GiB in one call that held the event loop for 14 s."""

    def __init__(self, coding: str, cap: int) -> None:
        self.cap = cap
        self.total = 0
        self.chunks: list[bytes] = []
        self.coding = coding
        self.inflater: Any = None
        self.wbits = 0
        self.ended = False  # a gzip member ended, and what follows is no other one: ignored, as httpx did
        self.started = False

    def _start(self) -> None:
        """Read the coding at the body's first byte: an empty body (HEAD, 204) has none to read."""
        self.started = True
        coding = self.coding
        codings = [c for c in (c.strip().lower() for c in coding.split(",")) if c and c != "identity"]
        if len(codings) > 1:
            raise Refused(f"the answer is encoded {len(codings)} times ({coding[:60]!r}); one coding is read at most")
        if codings and codings[0] not in ("gzip", "x-gzip", "deflate"):
            why = f"the answer's Content-Encoding {codings[0][:30]!r} is not one the runner reads ({ACCEPT_ENCODING})"
            raise Refused(why)
        self.wbits = (zlib.MAX_WBITS if codings[0] == "deflate" else 16 + zlib.MAX_WBITS) if codings else 0
        self.inflater = zlib.decompressobj(self.wbits) if codings else None

    def feed(self, data: bytes) -> None:
        if data and not self.started:
            self._start()
        if self.ended or not data:
            return
        if self.inflater is None:
            self._keep(data)
            return
        try:
            while data:
                self._keep(self.inflater.decompress(data, self.cap - self.total + 1))
                data = self.inflater.unconsumed_tail
                if self.inflater.eof and self.inflater.unused_data:
                    if not self.inflater.unused_data.startswith(b"\x1f\x8b"):  # no other gzip member
                        self.ended = True
                        return
                    data = self.inflater.unused_data
                    self.inflater = zlib.decompressobj(self.wbits)
        except zlib.error as exc:
            if self.wbits == zlib.MAX_WBITS and not self.total:  # deflate sent raw, without zlib's header
                self.wbits = -zlib.MAX_WBITS
                self.inflater = zlib.decompressobj(self.wbits)
                self.feed(data)
                return
            raise Refused(f"the answer's body does not decode: {exc}") from None

    def _keep(self, out: bytes) -> None:
        self.total += len(out)
        if self.total > self.cap:
            raise Refused(f"the answer is over runner.max_response_bytes ({self.cap})")
        self.chunks.append(out)

    def content(self) -> bytes:
        if self.inflater is not None and not self.ended:
            self._keep(self.inflater.flush())
        return b"".join(self.chunks)


async def send(req: Request, runner: RunnerConfig, timeout: float, trust_env: bool) -> dict[str, Any]:
    """Make the call and read at most ``runner.max_response_bytes`` of the answer, decoded."""
    cap = runner.max_response_bytes
    headers = dict(req.headers)
    if not any(k.lower() == "accept-encoding" for k in headers):
        headers["Accept-Encoding"] = ACCEPT_ENCODING
    async with (
        httpx.AsyncClient(timeout=timeout, trust_env=trust_env, follow_redirects=False) as client,
        client.stream(req.method, req.url, headers=headers, extensions=req.extensions, **req.body) as resp,
    ):
        if resp.status_code >= 400:  # its body is not read: whatever it holds, the status decides
            retry = resp.status_code >= 500 or resp.status_code == 429
            raise ApplicationError(f"answered {resp.status_code}", type="HttpStatus", non_retryable=not retry)
        declared = resp.headers.get("content-length", "")
        coding = resp.headers.get("content-encoding", "")
        if declared.isdigit() and int(declared) > cap and not coding:
            raise Refused(f"the answer is {declared} bytes, over runner.max_response_bytes ({cap})")
        decoded = _Decoded(coding, cap)
        async for chunk in resp.aiter_raw():
            decoded.feed(chunk)
            await asyncio.sleep(0)  # at most a chunk's worth of decoding between two turns of the loop
    content = decoded.content()
    try:
        body: Any = json.loads(content)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's stack
        body = content.decode(resp.encoding or "utf-8", errors="replace")
    return {"status": resp.status_code, "body": body}


async def run(
    config: BridgeConfig,
    call: HttpCall,
    *,
    env: Mapping[str, str] | None = None,
    resolver: Resolver = resolve,
    public: Callable[[IP], bool] = is_public,
) -> dict[str, Any]:
    """The HTTP_REQUEST activity's work: every failure is an ApplicationError with a safe message."""
    task = find_task(config, call.workflow_id, call.task_id)
    runner = config.runner
    timeout = min(runner.timeout_seconds, task.config.timeout_seconds or runner.timeout_seconds, call.timeout_seconds)
    where = f"http task {call.task_id!r} of {call.workflow_id!r}: {task.config.method} {redact_url(task.config.url)}"
    sub = Substitution("-")
    try:
        req, sub = prepare(task, call.context, os.environ if env is None else env)
        async with asyncio.timeout(timeout):
            trust_env = await route(req, runner, resolver, public)
            return await send(req, runner, timeout, trust_env)
    except Refused as exc:
        raise ApplicationError(f"{where}: refused: {sub.scrub(str(exc))}", type="Refused", non_retryable=True) from None
    except ConfigError as exc:
        raise ApplicationError(f"{where}: {exc}", type="Refused", non_retryable=True) from None
    except ApplicationError as exc:
        raise ApplicationError(
            f"{where}: {sub.scrub(exc.message)}", type=exc.type, non_retryable=exc.non_retryable
        ) from None
    except (TimeoutError, httpx.TimeoutException):
        raise ApplicationError(f"{where}: no answer within {timeout:g} s", type="Timeout") from None
    except httpx.LocalProtocolError as exc:  # h11's text quotes what it refused, escaped: no scrub finds it
        raise ApplicationError(f"{where}: {type(exc).__name__}", type="Transport") from None
    except httpx.HTTPError as exc:
        reason = sub.scrub(f"{type(exc).__name__}: {exc}")[:300]
        raise ApplicationError(f"{where}: {reason}", type="Transport") from None
