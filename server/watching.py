"""Watching: match servers follow players' loadouts (PROTOCOL.md §11).

A ``watch`` first subscribes this gateway to each user's push channel, through
the same reference-counted subscriptions as players' own connections
(``server.pushes.PushFanout``): a player watched by a match server and
connected here with three devices is one Redis subscription, and a change
reaches exactly the gateways that have someone for it, never a broadcast that
everyone filters.  *Then* it takes the users' snapshots from their shards, as
``inspect`` requests that the batchers carry to each shard together.  Pushes
that arrive in between wait; once the ``watching`` reply is out, those newer
than the snapshot follow it, and later ones go straight through.  So per user
a watcher sees the snapshot and then every change after it, in version order,
none missed: the shard publishes a user's pushes in version order on one
channel, and Redis keeps that order.

A push to a watcher is the shard's push with ``user`` added, decoded and
encoded once per push and form (JSON, MessagePack), whatever the number of
watchers.  A player's own connections get the shard's bytes as they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from protocol.codec import Codec
from protocol.errors import ErrorCode, RequestError
from protocol.messages import (
    Error,
    Inspect,
    StateReply,
    Unwatch,
    Unwatched,
    Watch,
    WatchedUser,
    Watching,
)
from server.batching import Backend, ShardBusy
from server.metrics import Metrics

__all__ = ["SNAPSHOT_TIMEOUT", "SUBSCRIBE_TIMEOUT", "Subscriptions", "Watcher", "Watches"]

log = logging.getLogger("loadout.watching")

#: How long a ``watch`` waits for Redis to confirm its subscriptions...
SUBSCRIBE_TIMEOUT = 5.0
#: ...and for the shards' snapshots; then ``unavailable``, and nothing changes.
SNAPSHOT_TIMEOUT = 30.0
#: The pushes a watcher gets: ``inventory`` only when it asked for it.
_INVENTORY, _LOADOUT = "inventory", "loadout"


class _Head(msgspec.Struct):
    """What a watcher's filter reads of a push."""

    type: str
    version: int = 0


_head = msgspec.msgpack.Decoder(_Head)
_any = msgspec.msgpack.Decoder()
_snapshot = msgspec.msgpack.Decoder(StateReply | Error)
_as_msgpack = msgspec.msgpack.Encoder()
_as_json = msgspec.json.Encoder()


class Subscriptions(Protocol):
    """The gateway's push subscriptions (``server.pushes.PushFanout``)."""

    def subscribe(self, user_id: str) -> asyncio.Future[None]: ...

    def unwatch(self, user_id: str) -> None: ...


class _Push:
    """A watched user's push, and its forms with ``user`` once made."""

    __slots__ = ("data", "forms", "kind", "user", "version")

    def __init__(self, user: str, kind: str, version: int, data: bytes) -> None:
        self.user, self.kind, self.version, self.data = user, kind, version, data
        self.forms: dict[bool, bytes] = {}

    def encoded(self, binary: bool) -> bytes:
        form = self.forms.get(binary)
        if form is None:
            message: dict[str, Any] = _any.decode(self.data)
            message["user"] = self.user
            form = self.forms[binary] = (_as_msgpack if binary else _as_json).encode(message)
        return form


class _Watch:
    """One watched user of one connection."""

    __slots__ = ("floor", "inventory", "snapshots", "waiting")

    def __init__(self, inventory: bool) -> None:
        self.inventory = inventory
        #: The version of the last snapshot sent: pushes up to it are in it.
        self.floor = -1
        #: Snapshots being taken; meanwhile pushes wait in ``waiting``.
        self.snapshots = 0
        self.waiting: list[_Push] = []


class Watcher:
    """One connection's watches; ``reply`` answers a request (once each),
    ``send`` queues a push."""

    def __init__(
        self, codec: Codec, send: Callable[[bytes], None], reply: Callable[[bytes], None]
    ) -> None:
        self.codec = codec
        self.send = send
        self.reply = reply
        self.users: dict[str, _Watch] = {}
        self.closed = False


class Watches:
    """Every watch of one gateway, by connection and by watched user."""

    def __init__(self, backend: Backend, limit: int, metrics: Metrics) -> None:
        self._backend = backend
        self._limit = limit
        self._metrics = metrics
        #: Set by the app once Redis is up; without it, watches get no pushes.
        self.subscriptions: Subscriptions | None = None
        self._watchers: dict[str, set[Watcher]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -------------------------------------------------------------- requests

    def watch(self, watcher: Watcher, request: Watch) -> None:
        users = list(dict.fromkeys(request.users))
        new = [user for user in users if user not in watcher.users]
        if len(watcher.users) + len(new) > self._limit:
            error = RequestError(
                ErrorCode.LIMIT_EXCEEDED, f"a connection watches at most {self._limit} users"
            )
            return self._refuse(watcher, request.rid, error)
        for user in new:
            watcher.users[user] = _Watch(request.inventory)
            self._watchers.setdefault(user, set()).add(watcher)
        entries = [watcher.users[user] for user in users]
        for entry in entries:
            entry.snapshots += 1
        # Counted at once, so that a close from now on balances them.
        ready = [self.subscriptions.subscribe(u) for u in new] if self.subscriptions else []
        task = asyncio.get_running_loop().create_task(
            self._answer(watcher, request, users, entries, set(new), ready)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def unwatch(self, watcher: Watcher, request: Unwatch) -> None:
        users = list(dict.fromkeys(request.users))
        for user in users:
            if watcher.users.pop(user, None) is not None:
                self._forget(watcher, user)
        self._metrics.count("unwatch", "ok")
        watcher.reply(watcher.codec.encode(Unwatched(rid=request.rid, users=users)))

    def end(self, watcher: Watcher) -> None:
        """The connection closed: its watches end."""
        watcher.closed = True
        for user in watcher.users:
            self._forget(watcher, user)
        watcher.users.clear()

    # ---------------------------------------------------------------- pushes

    def deliver(self, user: str, data: bytes) -> None:
        """A push of ``user`` from Redis: to the connections watching them here."""
        watchers = self._watchers.get(user)
        if not watchers:
            return
        head = _head.decode(data)
        if head.type != _LOADOUT and head.type != _INVENTORY:
            return
        push = _Push(user, head.type, head.version, data)
        for watcher in watchers:
            entry = watcher.users[user]
            if entry.snapshots:
                entry.waiting.append(push)
            else:
                self._push(watcher, entry, push)

    def _push(self, watcher: Watcher, entry: _Watch, push: _Push) -> None:
        if push.version <= entry.floor or (push.kind == _INVENTORY and not entry.inventory):
            return
        self._metrics.pushes.inc()
        watcher.send(push.encoded(watcher.codec.binary))

    # ------------------------------------------------------------- snapshots

    async def _answer(
        self,
        watcher: Watcher,
        request: Watch,
        users: list[str],
        entries: list[_Watch],
        new: set[str],
        ready: list[asyncio.Future[None]],
    ) -> None:
        try:
            await self._subscribed(ready)
            states = await self._snapshots(users)
        except RequestError as refused:
            self._refuse(watcher, request.rid, refused)
            return self._undo(watcher, users, entries, new)
        except Exception as exc:
            log.warning("watch of %d users failed: %r", len(users), exc)
            failed = RequestError(ErrorCode.UNAVAILABLE, "could not take the snapshots; retry")
            self._refuse(watcher, request.rid, failed)
            return self._undo(watcher, users, entries, new)
        views = [_view(state, request.inventory) for state in states]
        self._metrics.count("watch", "ok")
        watcher.reply(watcher.codec.encode(Watching(rid=request.rid, users=views)))
        for user, entry, state in zip(users, entries, states, strict=True):
            entry.snapshots -= 1
            entry.floor = max(entry.floor, state.version)
            if watcher.users.get(user) is entry:  # (not unwatched meanwhile)
                entry.inventory = request.inventory
                self._release(watcher, entry)

    async def _subscribed(self, ready: list[asyncio.Future[None]]) -> None:
        """Wait for Redis to confirm the new subscriptions (shared futures:
        shielded, so that a timeout here cancels no one else's wait)."""
        if not ready:
            return
        done = asyncio.gather(*(asyncio.shield(f) for f in ready), return_exceptions=True)
        outcomes = await asyncio.wait_for(done, SUBSCRIBE_TIMEOUT)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise failed[0]

    async def _snapshots(self, users: list[str]) -> list[StateReply]:
        """Each user's state, from the shards (one ``inspect`` each, batched
        per shard by the gateway's batchers)."""
        loop = asyncio.get_running_loop()
        answers = [loop.create_future() for _ in users]
        for user, answer in zip(users, answers, strict=True):
            try:
                self._backend.submit(user, Inspect(user=user), _setter(answer))
            except ShardBusy:
                busy = "the server is overloaded; retry"
                raise RequestError(ErrorCode.UNAVAILABLE, busy) from None
        replies = await asyncio.wait_for(asyncio.gather(*answers), SNAPSHOT_TIMEOUT)
        states = []
        for data in replies:
            reply = _snapshot.decode(data)
            if isinstance(reply, Error):
                raise RequestError(_code(reply.code), reply.message, reply.retry_after_ms)
            states.append(reply)
        return states

    def _undo(
        self, watcher: Watcher, users: list[str], entries: list[_Watch], new: set[str]
    ) -> None:
        """A failed ``watch`` changes nothing: its new users are dropped, and
        the pushes of those already watched that waited follow the error."""
        for user, entry in zip(users, entries, strict=True):
            entry.snapshots -= 1
            if watcher.users.get(user) is not entry:
                continue
            if user in new:
                del watcher.users[user]
                self._forget(watcher, user)
            else:
                self._release(watcher, entry)

    def _release(self, watcher: Watcher, entry: _Watch) -> None:
        if entry.snapshots:
            return
        waiting, entry.waiting = entry.waiting, []
        for push in waiting:
            self._push(watcher, entry, push)

    def _forget(self, watcher: Watcher, user: str) -> None:
        watchers = self._watchers.get(user)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[user]
        if self.subscriptions is not None:
            self.subscriptions.unwatch(user)

    def _refuse(self, watcher: Watcher, rid: str | int | None, error: RequestError) -> None:
        self._metrics.count("watch", error.code.value)
        watcher.reply(watcher.codec.encode_error(rid, error))


def _view(state: StateReply, inventory: bool) -> WatchedUser:
    if not inventory:
        return WatchedUser(state.user, state.version, state.profiles)
    return WatchedUser(state.user, state.version, state.profiles, state.balance, state.inventory)


def _setter(answer: asyncio.Future[bytes]) -> Callable[[bytes], None]:
    def settle(data: bytes) -> None:
        if not answer.done():  # (not after a timeout)
            answer.set_result(data)

    return settle


def _code(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL
