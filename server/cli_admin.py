"""One admin request to the running server, as ``loadout grant``,
``loadout refund`` and ``loadout order ...`` make it: a WebSocket connection
with a short-lived admin token signed with the server's secret."""

from __future__ import annotations

import asyncio
from typing import Any

from server.config import NoSecret, Settings

__all__ = ["AdminError", "admin_request", "refusal"]


class AdminError(Exception):
    """The request could not be made; the message says why, in one line."""


async def admin_request(settings: Settings, url: str | None, request: Any) -> dict[str, Any]:
    """The server's reply to ``request`` (a protocol ``Request``), sent on an
    admin connection to ``url`` (default: ``LOADOUT_HOST``/``LOADOUT_PORT``)."""
    import msgspec
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    from protocol.codec import codec_for
    from protocol.messages import Role
    from server.auth import issue_token

    try:
        secret = settings.with_secret(create=False).secret
    except NoSecret as exc:
        raise AdminError(str(exc)) from None
    token = issue_token(secret, "loadout-cli", Role.ADMIN, ttl=60)
    url = url or f"ws://{settings.host}:{settings.port}/v1/ws"
    codec = codec_for(None)
    try:
        async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # welcome
            await ws.send(msgspec.json.encode(request).decode())
            reply: dict[str, Any] = codec.decode_any(await asyncio.wait_for(ws.recv(), 30))
    except InvalidStatus as exc:
        raise AdminError(refusal(url, exc.response.status_code, exc.response.body)) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise AdminError(f"cannot reach the server at {url}: {exc}") from None
    return reply


def refusal(url: str, status: int, body: bytes | bytearray | None) -> str:
    """One line for a server that refused the connection at the handshake."""
    said = (body or b"").decode("utf-8", "replace").strip().splitlines()[:1]
    reason = f" ({said[0][:200]})" if said else ""
    if status == 401:
        return (
            f"the server at {url} refused our token{reason}: this LOADOUT_SECRET, or the"
            " secret in LOADOUT_DATA_DIR, is not the server's"
        )
    return f"the server at {url} refused the connection: HTTP {status}{reason}"
