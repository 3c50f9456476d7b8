"""``loadout catalog show``: the live catalog, as a table and as clients see it."""

from __future__ import annotations

import json
from pathlib import Path

from actors.catalog import demo_catalog_text, parse_catalog
from tests.e2e.support import ServerProcess
from tests.e2e.test_cli import make_database

#: 2027-01-01T00:00:00Z, when the demo catalog's sale of br.emote.dance ends.
SALE_ENDS_AT = 1_798_761_600_000


def test_catalog_show_without_a_running_server(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", None)
    make_database(proc.data_dir)
    nothing = proc.cli("catalog", "show")
    assert nothing.returncode != 0 and "no catalog has been published" in nothing.stderr

    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    first.write_text(demo_catalog_text())
    second.write_text(demo_catalog_text().replace("price = 500", "price = 450"))
    for path in (first, second):
        assert proc.cli("catalog", "load", str(path)).returncode == 0

    as_json = proc.cli("catalog", "show", "--json")
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    assert shown["version"] == 2  # the newest published version
    items = {item["sku"]: item for item in shown["items"]}
    assert set(items) == {item.sku for item in parse_catalog(demo_catalog_text()).items}
    emote = items["br.emote.dance"]
    assert (emote["price"], emote["base_price"], emote["sale_ends_at"]) == (90, 120, SALE_ENDS_AT)
    assert items["br.rifle.dragon"]["price"] == 450
    assert items["plat.chest.daily"]["limit"] == {"count": 1, "per_seconds": 86_400}
    assert items["br.skin.ghost.trial"]["duration_seconds"] == 7 * 86_400
    assert items["br.bundle.starter"]["bundle"] == [
        {"sku": "br.rifle.tiger", "quantity": 1},
        {"sku": "plat.life.extra", "quantity": 3},
    ]
    assert items["br.glider.phoenix"]["status"] == "coming_soon"  # every status is listed

    kart = proc.cli("catalog", "show", "--game", "kart", "--json")
    assert kart.returncode == 0, kart.stderr
    games = {item["game"] for item in json.loads(kart.stdout)["items"]}
    assert games == {"kart", None}  # that game's items and the platform-wide ones

    table = proc.cli("catalog", "show")
    assert table.returncode == 0, table.stderr
    assert "catalog version 2" in table.stdout
    emote_row = next(line for line in table.stdout.splitlines() if "br.emote.dance" in line)
    assert "Victory Dance" in emote_row and "90" in emote_row and "120" in emote_row
    assert "2027-01-01 00:00Z" in emote_row
    assert "1 per 1d" in table.stdout and "7d" in table.stdout

    unknown = proc.cli("catalog", "show", "--game", "nope")
    assert unknown.returncode != 0 and "no game 'nope'" in unknown.stderr
