"""A match server's side of PROTOCOL.md §11, for tests: a connection read
all the time, and the view of its watched users that a match server builds
from nothing but its ``watching`` snapshots and the pushes that follow,
noting every breach of the order §11 promises."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tests.e2e.support import Client, ServerProcess

#: How long a wait on the server lasts before the test fails: generous, for a loaded machine.
WAIT = 30.0


class Live:
    """A connection read all the time (so that pushes never back up): replies
    settle their requests, pushes are kept and handed to ``on_push``."""

    def __init__(
        self, client: Client, on_push: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.client = client
        self.on_push = on_push
        self.pushes: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        #: Replies to no request of ours (none are expected).
        self.strays: list[dict[str, Any]] = []
        self._replies: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, server: ServerProcess, user: str, **kwargs: Any) -> Live:
        on_push = kwargs.pop("on_push", None)
        return cls(await Client.open(server, user, **kwargs), on_push)

    async def _read(self) -> None:
        try:
            while True:
                message = self._decode(await self.client.ws.recv())
                if "rid" in message:
                    if message["type"] == "watching" and self.on_push is not None:
                        self.on_push(message)  # (snapshots before the pushes that follow)
                    waiting = self._replies.pop(message["rid"], None)
                    if waiting is None:
                        self.strays.append(message)
                    else:
                        waiting.set_result(message)
                    continue
                self.pushes.append(message)
                if self.on_push is not None:
                    self.on_push(message)
                async with self._changed:
                    self._changed.notify_all()
        except BaseException as exc:
            self.error = exc
            for waiting in self._replies.values():
                if not waiting.done():
                    waiting.set_exception(ConnectionError(f"connection lost: {exc!r}"))
            async with self._changed:
                self._changed.notify_all()
            raise

    def _decode(self, frame: bytes | str) -> dict[str, Any]:
        """(Not ``Client.recv``: its ``wait_for`` may swallow a cancellation.)"""
        if self.client.binary:
            assert isinstance(frame, bytes), "msgpack replies come in binary frames"
            decoded: dict[str, Any] = msgspec.msgpack.decode(frame)
        else:
            assert isinstance(frame, str), "json replies come in text frames"
            decoded = msgspec.json.decode(frame)
        return decoded

    async def request(self, message: dict[str, Any], timeout: float = WAIT) -> dict[str, Any]:
        """Send and await the reply; ``rate_limited`` is waited out and retried."""
        for _ in range(50):
            rid = f"r{next(_rids)}"
            reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._replies[rid] = reply
            await self.client.send({**message, "rid": rid})
            try:
                async with asyncio.timeout(timeout):  # (wait_for may swallow a cancel)
                    answer = await reply
            except TimeoutError:
                raise AssertionError(f"no reply in {timeout}s to {message}") from None
            if answer.get("code") != "rate_limited":
                return answer
            await asyncio.sleep(answer["retry_after_ms"] / 1000)
        raise AssertionError(f"rate limited for good: {message}")

    async def until(
        self, ready: Callable[[], bool], what: Callable[[], str], timeout: float = WAIT
    ) -> None:
        """Wait until ``ready()`` holds after some push (else fail, saying ``what()``)."""

        def done() -> bool:
            return ready() or self.error is not None

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            raise AssertionError(f"not within {timeout}s: {what()}") from None
        assert self.error is None, f"{what()}: connection lost: {self.error!r}"

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        await self.client.close()


_rids = itertools.count(1)


@dataclass
class Seen:
    """A watched user as the watcher knows them: snapshot plus pushes."""

    version: int
    balance: int
    inventory: dict[str, dict[str, Any]]
    profiles: dict[str, dict[str, Any]]
    #: What the pushes of ``version`` were (none: it came from the snapshot).
    pushed: set[tuple[str, str]] = field(default_factory=set)
    #: The skus seen held, then seen leave the inventory.
    left: set[str] = field(default_factory=set)


@dataclass
class WatcherView:
    """What the match server learns, from the watcher's frames only."""

    users: dict[str, Seen] = field(default_factory=dict)
    #: Every breach of §11 seen: a push before the snapshot, out of order, a gap.
    faults: list[str] = field(default_factory=list)

    def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "watching":
            for s in message["users"]:
                inventory = {i["sku"]: i for i in s["inventory"]}
                profiles = {p["profile"]: p for p in s["profiles"]}
                self.users[s["user"]] = Seen(s["version"], s["balance"], inventory, profiles)
        elif message["type"] in ("inventory", "loadout"):
            self._apply(message)

    def _apply(self, push: dict[str, Any]) -> None:
        user, version = push["user"], push["version"]
        seen = self.users.get(user)
        if seen is None:
            return self.faults.append(f"{user}: a push before its snapshot: {push}")
        what = (push["type"], push.get("profile", ""))
        if version < seen.version or (version == seen.version and not seen.pushed):
            self.faults.append(f"{user}: version {version} after {seen.version}: {push}")
        elif version == seen.version and what in seen.pushed:
            self.faults.append(f"{user}: a second {what} push of version {version}")
        elif version > seen.version + 1:
            self.faults.append(f"{user}: a gap from {seen.version} to {version}")
        if version > seen.version:
            seen.version, seen.pushed = version, set()
        seen.pushed.add(what)
        if push["type"] == "loadout":
            seen.profiles[push["profile"]] = {k: push[k] for k in ("profile", "game", "equipped")}
            return None
        seen.balance = push["balance"]
        for item in push["items"]:
            if item["quantity"]:
                seen.inventory[item["sku"]] = item
            elif seen.inventory.pop(item["sku"], None) is not None:
                seen.left.add(item["sku"])
        return None

    def as_state(self, user: str) -> dict[str, Any]:
        seen = self.users[user]
        return {
            "version": seen.version,
            "balance": seen.balance,
            "inventory": seen.inventory,
            "profiles": seen.profiles,
        }


def gone(sku: str) -> dict[str, Any]:
    """An inventory push's entry for an item that left."""
    return {"sku": sku, "quantity": 0, "expires_at": None}
