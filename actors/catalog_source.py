"""Publishing catalog files to PostgreSQL and loading the live catalog back."""

from __future__ import annotations

import asyncpg
import msgspec

from actors.catalog import Catalog, CatalogDocument, ItemSpec, parse_catalog
from persistence import store

__all__ = ["load_live_catalog", "publish_catalog_text"]

_encoder = msgspec.msgpack.Encoder()
_document = msgspec.msgpack.Decoder(CatalogDocument)
_item = msgspec.msgpack.Decoder(ItemSpec)


async def publish_catalog_text(
    pool: asyncpg.Pool, text: str, source: str, *, only_if_none: bool = False
) -> int | None:
    """Validate catalog TOML and publish it as a new version (atomically).

    Raises ``CatalogFileError`` for an invalid file, having changed nothing."""
    doc = parse_catalog(text)
    items = [
        store.ItemRow(
            item.sku,
            item.game,
            item.category,
            item.kind.value,
            item.status.value,
            item.price,
            _encoder.encode(item),
        )
        for item in doc.items
    ]
    return await store.publish_catalog(
        pool,
        source,
        _encoder.encode(doc),
        [(g.code, g.name) for g in doc.games],
        items,
        only_if_none=only_if_none,
    )


async def load_live_catalog(pool: asyncpg.Pool) -> Catalog:
    row = await store.load_catalog(pool)
    if row is None:
        return Catalog.empty()
    retired = [_item.decode(d) for d in await store.load_retired_items(pool, row.version)]
    return Catalog.from_document(row.version, _document.decode(row.document), retired)
