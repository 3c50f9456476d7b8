"""Who may open a connection: the peer's address, counted, and the file
descriptors that connections need.

picows hands the gateway's handshake callback the HTTP request but not the
address it came from, and a per-address limit must refuse at the handshake
(HTTP 429) rather than accept the WebSocket and close it at once.  So the
gateway's listening server is built here from picows' own server protocol,
subclassed only to note the peer's address when the TCP connection is made
and to pass it to the handshake callback.  Everything else (the handshake,
its timeout, framing, pings) stays picows'.

Addresses are counted by ``address_key``: an IPv4 address as itself, an IPv6
address by its /64 network, because one IPv6 host commonly holds a whole /64
and could otherwise take a new address for every connection.

The file-descriptor limit: every connection is a socket, so a gateway that
may hold ``LOADOUT_MAX_CONNECTIONS`` of them needs a soft ``RLIMIT_NOFILE``
above that (1,024 by default on many systems).  ``raise_fd_limit`` raises the
soft limit as far as the hard limit allows, once at start-up, and
``connection_limit`` lowers the connections a gateway admits to what the
limit it got leaves room for: past it, ``accept`` would fail with EMFILE and
clients would wait in the listen backlog instead of being refused (503).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
from collections.abc import Callable
from typing import Any

from picows import WSAutoPingStrategy, WSUpgradeRequest, WSUpgradeResponseWithListener
from picows.picows import WSProtocol  # type: ignore[attr-defined]

__all__ = [
    "FD_HEADROOM",
    "Upgrade",
    "address_key",
    "connection_limit",
    "raise_fd_limit",
    "serve_websockets",
]

log = logging.getLogger("loadout.admission")

#: File descriptors a server needs besides its WebSockets: connections to
#: PostgreSQL, Redis and the shards, logs, sockets still in their handshake.
FD_HEADROOM = 1024

#: The gateway's handshake callback: the request and the peer's address key.
Upgrade = Callable[[WSUpgradeRequest, str], WSUpgradeResponseWithListener]


def address_key(peer: Any) -> str:
    """What connections are counted by: the IPv4 address, or the IPv6 /64.

    ``peer`` is what the transport reports as ``peername`` (a tuple whose
    first item is the host for TCP); anything else (a Unix socket) counts as
    one address, ``""``."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return ""
    host = peer[0].partition("%")[0]  # an IPv6 zone ("fe80::1%eth0") is no part of it
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _Peer:
    """The address of one connection, filled in when TCP connects.

    Kept apart from the protocol so that the handshake callback, which the
    protocol holds, does not hold the protocol (no reference cycle)."""

    __slots__ = ("address",)

    def __init__(self) -> None:
        self.address = ""


class _AddressedProtocol(WSProtocol):  # type: ignore[misc]
    """picows' server protocol that also learns the peer's address."""

    def __init__(self, upgrade: Upgrade, options: _Options) -> None:
        peer = self._loadout_peer = _Peer()
        super().__init__(
            None,  # host and port: a client's
            None,  # path: a client's
            False,  # the server side
            lambda request: upgrade(request, peer.address),
            options.logger,
            True,  # disconnect when on_ws_frame raises
            options.handshake_timeout,
            True,  # auto ping
            options.ping_interval,  # ping after this long without incoming data,
            options.ping_interval,  # and close if no pong comes in this long
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # auto pong
            options.max_frame,
            None,  # extra headers: a client's
            16 * 1024,  # initial read buffer, picows' default
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._loadout_peer.address = address_key(transport.get_extra_info("peername"))
        super().connection_made(transport)


class _Options:
    __slots__ = ("handshake_timeout", "logger", "max_frame", "ping_interval")

    def __init__(
        self, handshake_timeout: float, ping_interval: float, max_frame: int, logger: logging.Logger
    ) -> None:
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.max_frame = max_frame
        self.logger = logger


async def serve_websockets(
    upgrade: Upgrade,
    host: str,
    port: int,
    *,
    handshake_timeout: float,
    ping_interval: float,
    max_frame: int,
    logger: logging.Logger,
    reuse_port: bool = False,
) -> asyncio.Server:
    """Listen like picows' ``ws_create_server`` with automatic pings, calling
    ``upgrade`` with each handshake's request and the peer's address key.

    Like picows, it listens through aiofastnet when that is installed (picows
    depends on it) and through the event loop otherwise."""
    options = _Options(handshake_timeout, ping_interval, max_frame, logger)

    def protocol() -> _AddressedProtocol:
        return _AddressedProtocol(upgrade, options)

    loop = asyncio.get_running_loop()
    try:
        import aiofastnet
    except ImportError:
        return await loop.create_server(protocol, host, port, reuse_port=reuse_port)
    return await aiofastnet.create_server(loop, protocol, host, port, reuse_port=reuse_port)


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise the soft limit on open files to ``needed`` if it is lower, as
    far as the hard limit allows; return the soft limit before and after.

    Logged when it changes, and a warning when even the hard limit is short
    of ``needed``: connections past it would fail to be accepted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            target = soft
        else:
            log.info("raised the open-file limit from %d to %d", soft, target)
    if target < needed:
        log.warning(
            "the open-file limit is %d (hard limit %s), short of the %d that "
            "LOADOUT_MAX_CONNECTIONS needs: raise the hard limit (ulimit -Hn) or the setting",
            target, hard, needed,
        )  # fmt: skip
    return soft, target


def connection_limit(max_connections: int) -> int:
    """Raise the open-file limit for ``max_connections`` WebSockets (and
    ``FD_HEADROOM``); the connections a gateway may then admit:
    ``max_connections``, or fewer when the hard limit is short (logged)."""
    _, soft = raise_fd_limit(max_connections + FD_HEADROOM)
    if soft == resource.RLIM_INFINITY or soft - FD_HEADROOM >= max_connections:
        return max_connections
    allowed = max(1, soft - FD_HEADROOM)
    log.warning(
        "admitting at most %d connections, not the %d of LOADOUT_MAX_CONNECTIONS: "
        "the open-file limit is %d", allowed, max_connections, soft,
    )  # fmt: skip
    return allowed
