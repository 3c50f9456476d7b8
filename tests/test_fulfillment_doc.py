"""The one-line signed top-up of docs/fulfillment.md works as printed: run
with ``bash``, it sends a request that a receiver checking the signature rule
of PROTOCOL.md §12 (``Loadout-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<raw body>">``, 5 minutes' tolerance) accepts.  The
receiver's check is written here from that rule, not taken from the server,
so a command and a server that agree on a wrong rule would not pass."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "fulfillment.md"
_SH = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HEADER = re.compile(r"t=(\d+),v1=([0-9a-f]{64})")

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "openssl", "curl")),
    reason="the documented command needs bash, openssl and curl",
)


def topup_command() -> str:
    """The page's one shell line that posts to the payments webhook."""
    lines = [
        line
        for block in _SH.findall(DOC.read_text(encoding="utf-8"))
        for line in block.splitlines()
        if "/v1/webhooks/payments" in line
    ]
    assert len(lines) == 1, lines
    return lines[0]


def signed(raw: bytes, header: str, secret: str, now: float) -> bool:
    """PROTOCOL.md §12's rule, from its text."""
    match = _HEADER.fullmatch(header)
    if match is None:
        return False
    t, given = match.groups()
    expected = hmac.new(secret.encode(), t.encode() + b"." + raw, hashlib.sha256).hexdigest()
    return abs(now - int(t)) <= 300 and hmac.compare_digest(given, expected)


@dataclass
class Received:
    path: str
    content_type: str | None
    signature: str
    body: bytes
    accepted: bool


@dataclass
class Receiver:
    """A payment webhook receiver on loopback that only checks signatures."""

    secret: str
    port: int = 0
    received: list[Received] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(secret="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            header = self.headers.get("Loadout-Signature", "")
            accepted = signed(raw, header, state.secret, time.time())
            state.received.append(
                Received(self.path, self.headers.get("Content-Type"), header, raw, accepted)
            )
            status, body = (200, b'{"ok":true}') if accepted else (401, b"bad signature")
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LOADOUT_") and not k.lower().endswith("_proxy")
    }
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_documented_top_up_is_signed_as_the_contract_says(
    receiver: Receiver, tmp_path: Path
) -> None:
    """The secret from ``<data dir>/payments_webhook_secret``, the port from
    ``LOADOUT_HTTP_PORT``: one accepted request with the documented body."""
    receiver.secret = "pay-" + "Zx9_-" * 10
    data = tmp_path / "data"
    data.mkdir()
    (data / "payments_webhook_secret").write_text(receiver.secret)
    done = run(
        topup_command(), tmp_path, LOADOUT_DATA_DIR=str(data), LOADOUT_HTTP_PORT=str(receiver.port)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("HTTP 200"), done.stdout
    [request] = receiver.received
    assert (request.path, request.content_type) == ("/v1/webhooks/payments", "application/json")
    assert request.accepted, request.signature
    body = json.loads(request.body)
    assert set(body) == {"id", "type", "transaction", "user", "gems"}
    assert body["type"] == "payment.succeeded"
    assert isinstance(body["gems"], int) and body["gems"] >= 1


def test_the_environment_secret_wins_and_a_wrong_secret_is_refused(
    receiver: Receiver, tmp_path: Path
) -> None:
    """``LOADOUT_PAYMENTS_WEBHOOK_SECRET`` is used over the default data
    directory's file; signed with another secret than the receiver's, the
    request is refused (the check above can fail)."""
    (tmp_path / ".loadout").mkdir()
    (tmp_path / ".loadout" / "payments_webhook_secret").write_text("the-file-secret-" + "f" * 32)
    port = str(receiver.port)
    receiver.secret = "the-env-secret-" + "e" * 32
    done = run(
        topup_command(), tmp_path, LOADOUT_PAYMENTS_WEBHOOK_SECRET=receiver.secret,
        LOADOUT_HTTP_PORT=port,
    )  # fmt: skip
    assert done.stdout.rstrip().endswith("HTTP 200"), (done.stdout, done.stderr)
    receiver.secret = "the-file-secret-" + "f" * 32
    done = run(topup_command(), tmp_path, LOADOUT_HTTP_PORT=port)  # the file of ./.loadout
    assert done.stdout.rstrip().endswith("HTTP 200"), (done.stdout, done.stderr)
    receiver.secret = "yet-another-secret-" + "y" * 32
    done = run(topup_command(), tmp_path, LOADOUT_HTTP_PORT=port)
    assert done.stdout.rstrip().endswith("HTTP 401"), (done.stdout, done.stderr)
    assert [r.accepted for r in receiver.received] == [True, True, False]
