"""The documentation cannot drift: every JSON example of docs/protocol.md
decodes with the real codec, every message type of the protocol has an
example there, and every relative link of README.md and docs/*.md points to
a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from protocol.errors import ErrorCode
from protocol.messages import ClientMessage, ServerMessageUnion
from tests.docs_examples import PROTOCOL_DOC, Direction, direction_of, examples

REPO = Path(__file__).resolve().parents[1]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _tags(union: object) -> set[str]:
    return {str(member.__struct_config__.tag) for member in get_args(union)}


def test_every_example_decodes_with_the_real_codec() -> None:
    found = examples()
    assert len(found) > 30
    shown = {(e.message["type"], e.direction) for e in found}
    assert {(t, Direction.CLIENT) for t in _tags(ClientMessage)} <= shown
    assert {(t, Direction.SERVER) for t in _tags(ServerMessageUnion)} <= shown


def test_a_wrong_example_is_caught() -> None:
    with pytest.raises(ValueError):  # a misspelt field, which msgspec would ignore
        direction_of('{"type":"purchase","key":"k","sku":"s","price":5,"quantiy":2}')
    with pytest.raises(ValueError):
        direction_of('{"type":"purchased","purchase":"p","sku":"s","quantity":1}')
    with pytest.raises(ValueError):
        direction_of('{"type":"equip","profile":"main","slot":"hat"}')
    assert direction_of('{"type":"state","rid":1}') is Direction.CLIENT
    assert direction_of('{"type":"catalog_changed","version":2}') is Direction.SERVER


def test_every_error_code_is_documented() -> None:
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    assert [code for code in ErrorCode if f"| `{code.value}`" not in text and
            f"`{code.value}` /" not in text and f"/ `{code.value}`" not in text] == []  # fmt: skip


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [
        link
        for link in _LINK.findall(text)
        if not re.match(r"[a-z][a-z0-9+.-]*:", link) and not link.startswith("#")
    ]


def test_relative_links_resolve_inside_the_repository() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for link in relative_links(page):
            target = (page.parent / link.split("#")[0]).resolve()
            if not target.is_relative_to(REPO) or not target.is_file():
                broken.append(f"{page.relative_to(REPO)}: {link}")
    assert broken == []
    assert "docs/protocol.md" in relative_links(REPO / "README.md")
    assert "docs/architecture.md" in relative_links(REPO / "README.md")


def test_the_readme_points_nowhere_outside_the_repository() -> None:
    assert "../shared" not in (REPO / "README.md").read_text(encoding="utf-8")
