"""A client written only from docs/protocol.md: it connects as the page says
(``?token=``, the JSON subprotocol), sends the page's own example requests
and expects replies and pushes shaped like the page's examples.  If the page
and the server disagree, this fails."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.docs_examples import Direction, first
from tests.e2e.support import ServerProcess, fund, new_user


class DocClient:
    """Matches replies to requests by ``rid`` and keeps pushes, as the page's
    "Envelope" section tells a client to."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pushes: list[dict[str, Any]] = []

    async def recv(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
        return message

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.ws.send(json.dumps(message))
        while True:
            answer = await self.recv()
            if "rid" not in answer:
                self.pushes.append(answer)
            elif answer["rid"] == message["rid"]:
                return answer

    async def push(self, kind: str) -> dict[str, Any]:
        while not any(p["type"] == kind for p in self.pushes):
            answer = await self.recv()
            assert "rid" not in answer, answer
            self.pushes.append(answer)
        return next(p for p in self.pushes if p["type"] == kind)


def shaped_like(message: dict[str, Any], kind: str) -> None:
    """``message`` has the type and exactly the fields of the page's example."""
    example = first(kind, Direction.SERVER)
    assert message["type"] == kind, message
    assert set(message) == set(example), (message, example)


async def test_a_client_written_from_the_doc_plays_a_session(server: ServerProcess) -> None:
    user = new_user("doc")
    state, purchase = first("state", Direction.CLIENT), first("purchase", Direction.CLIENT)
    create = first("create_profile", Direction.CLIENT)
    equip = first("equip", Direction.CLIENT)
    await fund(server, user, purchase["price"])
    url = f"{server.url}?token={server.token(user)}"
    async with connect(url, subprotocols=["loadout.v1.json"]) as ws:  # type: ignore[list-item]
        client = DocClient(ws)
        welcome = await client.recv()
        shaped_like(welcome, "welcome")
        assert welcome["user"] == user

        before = await client.request(state)
        shaped_like(before, "state")
        assert before["balance"] == purchase["price"]

        purchase["key"] = uuid.uuid4().hex
        bought = await client.request(purchase)
        shaped_like(bought, "purchased")
        assert (bought["sku"], bought["balance"]) == (purchase["sku"], 0)
        assert bought["version"] > before["version"]
        inventory = await client.push("inventory")
        shaped_like(inventory, "inventory")
        assert inventory["version"] == bought["version"]
        assert [i["sku"] for i in inventory["items"]] == [purchase["sku"]]
        again = await client.request(purchase)  # the same key: the original reply
        assert again == {**bought, "rid": purchase["rid"]}

        created = await client.request(create)
        shaped_like(created, "profile_created")
        equipped = await client.request(equip)
        shaped_like(equipped, "equipped")
        assert (equipped["profile"], equipped["sku"]) == (equip["profile"], purchase["sku"])
        loadout = await client.push("loadout")
        shaped_like(loadout, "loadout")

        after = await client.request(state)
        profile = next(p for p in after["profiles"] if p["profile"] == equip["profile"])
        assert profile["equipped"] == {equip["slot"]: equip["sku"]}
        assert after["version"] == equipped["version"]
