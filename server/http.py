"""The HTTP port (``LOADOUT_HTTP_PORT``, PROTOCOL.md §12-13): ``/metrics``,
``/healthz`` and ``/readyz`` for operators and their load balancers, apart
from the public WebSocket port; webhooks will live here too.

A Starlette application served by uvicorn inside the gateway's own event
loop.  uvicorn would take SIGTERM and SIGINT for itself; ``loadout serve``
owns those (its graceful drain), so this server leaves them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

__all__ = ["HttpServer"]

_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the signals are loadout serve's (server/app.py)


class HttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Callable[[], bytes],
        readiness: Callable[[], tuple[bool, bytes]],
        reuse_port: bool = False,
        routes: list[Route] | None = None,
    ) -> None:
        async def healthz(request: Request) -> Response:
            return PlainTextResponse("ok\n")

        async def readyz(request: Request) -> Response:
            ready, body = readiness()
            return Response(body, 200 if ready else 503, media_type="application/json")

        async def render(request: Request) -> Response:
            return Response(metrics(), media_type=_METRICS_TYPE)

        self.app = Starlette(
            routes=[
                Route("/healthz", healthz),
                Route("/readyz", readyz),
                Route("/metrics", render),
                *(routes or []),
            ]
        )
        config = uvicorn.Config(
            self.app, host=host, port=port, log_level="warning", lifespan="off",
            access_log=False, server_header=False,
        )  # fmt: skip
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self._reuse_port = reuse_port

    async def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it (e.g. the port is taken)
                raise RuntimeError("the HTTP server stopped as it started")
            await asyncio.sleep(0.01)

    def _sockets(self) -> list[socket.socket] | None:
        """With ``reuse_port``, the listening socket, bound beside other
        processes' (``loadout serve --workers``); else uvicorn binds its own."""
        if not self._reuse_port:
            return None
        config = self._server.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((config.host, config.port))
        except OSError:
            sock.close()
            raise OSError(f"cannot listen on {config.host}:{config.port} (HTTP)") from None
        return [sock]

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=self._sockets())
        except SystemExit:  # uvicorn's answer to a port it cannot bind
            config = self._server.config
            raise OSError(f"cannot listen on {config.host}:{config.port} (HTTP)") from None

    @property
    def port(self) -> int:
        """The port bound (useful when configured as 0)."""
        sockets = self._server.servers[0].sockets
        port: int = sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
