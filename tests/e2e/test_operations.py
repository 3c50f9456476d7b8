"""The operators' endpoints of a running server (PROTOCOL.md §12-13)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from tests.e2e.support import ServerProcess


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


async def test_operators_endpoints_live_on_the_http_port(server: ServerProcess) -> None:
    """PROTOCOL.md §12-13: /metrics is on the HTTP port only; /readyz and
    /healthz on both."""
    with pytest.raises(urllib.error.HTTPError) as missing:
        await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/metrics")
    assert missing.value.code == 404
    for port in (server.port, server.http_port):
        ready = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz"))
        assert ready["ready"] is True and ready["down"] == []
        assert {"postgresql", "redis", "shard 0", "shard 1"} <= set(ready["dependencies"])
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz") == "ok\n"
