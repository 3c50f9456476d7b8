"""Voucher emails (server/mail.py) against a real SMTP server on loopback
(aiosmtpd, on the test's event loop), with and without TLS, and the outbox."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from server.mail import (
    MailError,
    OutboxMailer,
    SmtpMailer,
    Voucher,
    mailer_from,
    message_id,
    render,
    voucher_code,
)

SENDER = "Loadout <shop@loadout.example>"
VOUCHER = Voucher(
    order="o-1",
    user="alice",
    email="alice@example.com",
    sku="steam-10",
    item_name="Steam card 10",
    quantity=1,
    code="K7QX-9MZP-44RT-VB2N",
)


@dataclass
class Received:
    content: bytes
    recipients: list[str]
    tls: bool
    login: bytes | None

    def parsed(self) -> EmailMessage:
        message = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


@dataclass
class Inbox:
    """The server's handler: keeps what arrives; can be told to refuse."""

    received: list[Received] = field(default_factory=list)
    rcpt_reply: str | None = None
    data_reply: str | None = None
    logins: dict[bytes, bytes] = field(default_factory=lambda: {b"alice": b"s@cret:/x"})

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        assert server.transport is not None and isinstance(envelope.content, bytes)
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        self.received.append(
            Received(
                envelope.content,
                list(envelope.rcpt_tos),
                server.transport.get_extra_info("ssl_object") is not None,
                login,
            )
        )
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and self.logins.get(data.login) == data.password
        # handled=False: the server itself answers (235, or 535 on a failure).
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


@asynccontextmanager
async def smtp_server(
    inbox: Inbox, implicit_tls: ssl.SSLContext | None = None, **options: Any
) -> AsyncIterator[int]:
    """A real aiosmtpd server on a free loopback port; yields the port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(inbox, authenticator=inbox.authenticate, loop=loop, **options),
        "127.0.0.1",
        0,
        ssl=implicit_tls,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 made by the ``openssl`` CLI: (cert, key)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    request = "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1".split()
    san = ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    subprocess.run(
        ["openssl", *request, *san, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- rendering ---------------------------------------------------------------


def test_the_voucher_email_says_what_was_bought_and_the_code() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    message = render(VOUCHER, SENDER, now=now)
    assert message["Subject"] == "Your voucher for Steam card 10"
    assert message["To"] == "alice@example.com"
    assert message["From"] == SENDER
    assert message["Date"] == "Sat, 01 Mar 2025 12:00:00 +0000"
    assert message["Message-ID"] == "<voucher.o-1@loadout.example>"
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    for part in (text, html):
        content = part.get_content()
        assert VOUCHER.code in content
        assert "Steam card 10" in content
        assert "o-1" in content


def test_a_resend_is_the_same_message() -> None:
    first = render(VOUCHER, SENDER, now=datetime(2025, 3, 1, tzinfo=UTC))
    again = render(VOUCHER, SENDER, now=datetime(2025, 3, 2, tzinfo=UTC))
    assert first["Message-ID"] == again["Message-ID"]
    other = render(Voucher(**{**VOUCHER.__dict__, "order": "o-2"}), SENDER)
    assert other["Message-ID"] != first["Message-ID"]


def test_odd_order_ids_and_names_cannot_break_the_headers_or_the_html() -> None:
    odd = Voucher(
        **{**VOUCHER.__dict__, "order": "a.b/../<c>@d", "item_name": "Mug\r\nBcc: x@y <b>"}
    )
    message = render(odd, "no-at-sign")
    assert message["Subject"] == "Your voucher for Mug Bcc: x@y <b>"
    assert message["Bcc"] is None
    assert message["Message-ID"] == "<voucher.a%2Eb%2F%2E%2E%2F%3Cc%3E%40d@loadout.invalid>"
    html = message.get_body(("html",))
    assert html is not None and "Bcc: x@y &lt;b&gt;" in html.get_content()
    # The whole message survives a round trip through bytes.
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert parsed["Message-ID"] == message["Message-ID"]


def test_message_ids_are_stable_and_distinct() -> None:
    assert message_id("o-1", SENDER) == message_id("o-1", SENDER)
    ids = {message_id(order, SENDER) for order in ("o-1", "o-2", "o_1", "O-1", "o.1", "o/1")}
    assert len(ids) == 6
    assert message_id("o-1", "shop@other.example") == "<voucher.o-1@other.example>"


def test_voucher_codes_are_long_random_and_readable() -> None:
    codes = [voucher_code() for _ in range(2000)]
    assert len(set(codes)) == len(codes)
    for code in codes[:50]:
        groups = code.split("-")
        assert [len(group) for group in groups] == [4] * 5
        assert set("".join(groups)) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    # Every symbol turns up: the codes use the whole alphabet, not a corner of it.
    assert set("".join(codes).replace("-", "")) == set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


# -- SMTP --------------------------------------------------------------------


async def test_a_voucher_arrives_over_smtp_with_auth() -> None:
    inbox = Inbox()
    async with smtp_server(inbox, auth_require_tls=False) as port:
        # The password is percent-encoded in the URL (it holds "@", ":" and "/").
        mailer = SmtpMailer(f"smtp://alice:s%40cret%3A%2Fx@127.0.0.1:{port}", timeout=10)
        await mailer.send(render(VOUCHER, SENDER))
    [received] = inbox.received
    assert received.recipients == ["alice@example.com"]
    assert received.login == b"alice"
    assert not received.tls  # this server offers no STARTTLS
    message = received.parsed()
    assert message["Subject"] == "Your voucher for Steam card 10"
    assert message["Message-ID"] == message_id("o-1", SENDER)
    text = message.get_body(("plain",))
    assert text is not None and VOUCHER.code in text.get_content()


async def test_a_wrong_password_is_a_permanent_error() -> None:
    inbox = Inbox()
    async with smtp_server(inbox, auth_require_tls=False) as port:
        mailer = SmtpMailer(f"smtp://alice:wrong@127.0.0.1:{port}", timeout=10)
        with pytest.raises(MailError) as caught:
            await mailer.send(render(VOUCHER, SENDER))
    assert (caught.value.retryable, caught.value.code) == (False, 535)
    assert "wrong" not in str(caught.value)
    assert inbox.received == []


async def test_starttls_is_used_when_the_server_offers_it(certificate: tuple[Path, Path]) -> None:
    inbox = Inbox()
    # The server refuses AUTH and mail before STARTTLS: delivery proves TLS.
    tls = server_tls(certificate)
    async with smtp_server(inbox, tls_context=tls, require_starttls=True) as port:
        url = f"smtp://alice:s%40cret%3A%2Fx@127.0.0.1:{port}"
        await SmtpMailer(url, timeout=10, ca_file=certificate[0]).send(render(VOUCHER, SENDER))
    [received] = inbox.received
    assert received.tls
    assert received.login == b"alice"
    assert VOUCHER.code.encode() in received.content


async def test_the_servers_certificate_is_verified(certificate: tuple[Path, Path]) -> None:
    inbox = Inbox()
    async with smtp_server(inbox, tls_context=server_tls(certificate)) as port:
        # Self-signed and not among the trusted CAs: nothing is sent.
        mailer = SmtpMailer(f"smtp://127.0.0.1:{port}", timeout=10)
        with pytest.raises(MailError) as caught:
            await mailer.send(render(VOUCHER, SENDER))
    assert inbox.received == []
    assert isinstance(caught.value.__cause__, (ssl.SSLError, ConnectionError))


async def test_smtps_is_tls_from_the_first_byte(certificate: tuple[Path, Path]) -> None:
    inbox = Inbox()
    # aiosmtpd counts only STARTTLS as TLS for AUTH; this connection is TLS throughout.
    tls = server_tls(certificate)
    async with smtp_server(inbox, implicit_tls=tls, auth_require_tls=False) as port:
        mailer = SmtpMailer(
            f"smtps://alice:s%40cret%3A%2Fx@127.0.0.1:{port}", ca_file=certificate[0]
        )
        await mailer.send(render(VOUCHER, SENDER))
    [received] = inbox.received
    assert received.tls and received.login == b"alice"


@pytest.mark.parametrize(
    ("rcpt_reply", "data_reply", "retryable", "code"),
    [
        ("550 5.1.1 No such mailbox", None, False, 550),
        ("450 4.2.1 Mailbox busy", None, True, 450),
        (None, "554 5.6.0 Message rejected", False, 554),
        (None, "451 4.3.0 Try again later", True, 451),
    ],
)
async def test_smtp_replies_decide_whether_to_retry(
    rcpt_reply: str | None, data_reply: str | None, retryable: bool, code: int
) -> None:
    inbox = Inbox(rcpt_reply=rcpt_reply, data_reply=data_reply)
    async with smtp_server(inbox) as port:
        with pytest.raises(MailError) as caught:
            await SmtpMailer(f"smtp://127.0.0.1:{port}", timeout=10).send(render(VOUCHER, SENDER))
    assert (caught.value.retryable, caught.value.code) == (retryable, code)
    assert inbox.received == []


async def test_a_refused_connection_is_retryable() -> None:
    mailer = SmtpMailer(f"smtp://127.0.0.1:{free_port()}", timeout=10)
    with pytest.raises(MailError) as caught:
        await mailer.send(render(VOUCHER, SENDER))
    assert caught.value.retryable


async def test_a_silent_server_times_out_and_is_retryable() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never greets

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(MailError) as caught:
            await SmtpMailer(f"smtp://127.0.0.1:{port}", timeout=0.5).send(render(VOUCHER, SENDER))
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert caught.value.retryable
    assert accepted  # it did connect, then gave up waiting


@pytest.mark.parametrize(
    "url", ["http://host", "smtp://:secret@", "smtp:///x", "smtp://u:p@host:notaport", "host:25"]
)
def test_a_bad_smtp_url_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        SmtpMailer(url)
    assert url not in str(caught.value)


def test_the_password_never_shows() -> None:
    mailer = SmtpMailer("smtp://alice:hunter2@mail.example:2525")
    assert "hunter2" not in repr(mailer)
    assert repr(mailer) == "SmtpMailer(smtp://alice:***@mail.example:2525)"


# -- the outbox --------------------------------------------------------------


async def test_the_outbox_writes_one_parseable_file_per_order(tmp_path: Path) -> None:
    mailer = mailer_from(None, tmp_path)
    assert isinstance(mailer, OutboxMailer)
    await mailer.send(render(VOUCHER, SENDER))
    path = tmp_path / "outbox" / "o-1.eml"
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Message-ID"] == message_id("o-1", SENDER)
    text = parsed.get_body(("plain",))
    assert text is not None and VOUCHER.code in text.get_content()
    # Sent again (a resend after a crash): still one file, the latest.
    again = render(Voucher(**{**VOUCHER.__dict__, "code": "SECOND-CODE-0000"}), SENDER)
    await mailer.send(again)
    assert names(tmp_path / "outbox") == ["o-1.eml"]
    assert b"SECOND-CODE-0000" in path.read_bytes()


async def test_an_order_id_cannot_leave_the_outbox(tmp_path: Path) -> None:
    mailer = OutboxMailer(tmp_path / "outbox")
    odd = Voucher(**{**VOUCHER.__dict__, "order": "../../escape"})
    await mailer.send(render(odd, SENDER))
    assert names(tmp_path / "outbox") == ["%2E%2E%2F%2E%2E%2Fescape.eml"]
    assert names(tmp_path) == ["outbox"]


async def test_the_outbox_needs_the_order_header(tmp_path: Path) -> None:
    message = render(VOUCHER, SENDER)
    del message["X-Loadout-Order"]
    with pytest.raises(MailError) as caught:
        await OutboxMailer(tmp_path).send(message)
    assert not caught.value.retryable


def test_a_url_chooses_smtp(tmp_path: Path) -> None:
    mailer = mailer_from("smtps://mail.example", tmp_path, timeout=3)
    assert isinstance(mailer, SmtpMailer)
    assert (mailer.hostname, mailer.port, mailer.implicit_tls, mailer.timeout) == (
        "mail.example",
        None,
        True,
        3,
    )
    assert isinstance(mailer_from("", tmp_path), OutboxMailer)
