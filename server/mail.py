"""Voucher emails: rendered from a packaged template, then sent over SMTP or
written to an outbox directory (PROTOCOL.md §12).

Errors::

    MailError(retryable=True)    try again later: a 4xx reply, a refused or
                                 dropped connection, a timeout
    MailError(retryable=False)   this message will never go: a 5xx reply, the
                                 server lacks what we need (AUTH, ...)

The message id is derived from the order id, so a message sent again after a
crash (the fulfillment worker cannot tell "sent" from "not sent" when it died
in between) is recognisably the same message to the receiver, and the outbox
keeps one file per order.
"""

from __future__ import annotations

import asyncio
import html
import os
import secrets
import ssl
import string
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from importlib import resources
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import quote, unquote, urlsplit

import aiosmtplib

__all__ = [
    "ORDER_HEADER",
    "MailError",
    "Mailer",
    "OutboxMailer",
    "SmtpMailer",
    "Voucher",
    "mailer_from",
    "message_id",
    "render",
    "voucher_code",
]

#: Header naming the order a message fulfils (the outbox files it by this).
ORDER_HEADER: Final = "X-Loadout-Order"
#: Crockford's base32: no I, L, O or U, so a code read aloud or retyped
#: cannot be misread.
CODE_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Characters of a voucher code: 20 of 32 symbols, 100 bits from ``secrets``.
CODE_LENGTH: Final = 20
#: Seconds each SMTP step (connect, each command, the data) may take.
DEFAULT_TIMEOUT: Final = 30.0


@dataclass(frozen=True)
class Voucher:
    """What one voucher email says, and to whom."""

    order: str
    user: str
    email: str
    sku: str
    item_name: str
    quantity: int
    code: str


def voucher_code() -> str:
    """A new unguessable voucher code, grouped by four: ``XXXX-XXXX-XXXX-XXXX-XXXX``.

    Unique in practice (100 random bits); the store's unique constraint on
    codes stays the last line of defence."""
    symbols = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(symbols[i : i + 4] for i in range(0, CODE_LENGTH, 4))


class MailError(Exception):
    """A message was not sent; ``retryable`` says whether trying again can help."""

    def __init__(self, message: str, *, retryable: bool, code: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code


class Mailer(Protocol):
    """Sends one rendered message; raises ``MailError`` when it could not."""

    async def send(self, message: EmailMessage) -> None: ...


def _template(name: str) -> string.Template:
    return string.Template((resources.files("server") / "templates" / name).read_text("utf-8"))


_TEXT: Final = _template("voucher.txt")
_HTML: Final = _template("voucher.html")


def _one_line(text: str) -> str:
    """``text`` fit for a header: a line break there would start a new header."""
    return " ".join(text.split())


def _atom(text: str) -> str:
    """``text`` as a dot-free RFC 5322 atom (and a safe file name): percent-encoded."""
    return quote(text, safe="-_~").replace(".", "%2E")


def message_id(order: str, sender: str) -> str:
    """The ``Message-ID`` of ``order``'s email: the same on every resend."""
    _, at, domain = parseaddr(sender)[1].rpartition("@")
    domain = _atom(domain).replace("%2E", ".") if at and domain else "loadout.invalid"
    return f"<voucher.{_atom(order)}@{domain}>"


def render(voucher: Voucher, sender: str, *, now: datetime | None = None) -> EmailMessage:
    """The email that delivers ``voucher``: plain text with an HTML alternative."""
    fields = {
        "user": voucher.user,
        "item_name": voucher.item_name,
        "quantity": str(voucher.quantity),
        "code": voucher.code,
        "order": voucher.order,
        "sku": voucher.sku,
    }
    message = EmailMessage()
    message["Subject"] = _one_line(f"Your voucher for {voucher.item_name}")
    message["From"] = sender
    message["To"] = voucher.email
    message["Date"] = format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = message_id(voucher.order, sender)
    message[ORDER_HEADER] = _one_line(voucher.order)
    message.set_content(_TEXT.substitute(fields))
    escaped = {name: html.escape(value) for name, value in fields.items()}
    message.add_alternative(_HTML.substitute(escaped), subtype="html")
    return message


class SmtpMailer(Mailer):
    """Sends over SMTP: ``smtp://[user:pass@]host[:port]`` (STARTTLS whenever
    the server offers it) or ``smtps://...`` (TLS from the first byte).

    One connection per message: vouchers are few, and a fresh connection
    never inherits a half-broken session. Certificates are verified against
    the system's CAs, or ``ca_file`` (a private mail relay's CA).
    """

    def __init__(
        self, url: str, *, timeout: float = DEFAULT_TIMEOUT, ca_file: str | Path | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            # The URL is not echoed: it may hold a password.
            raise ValueError("LOADOUT_SMTP_URL must look like smtp://user:pass@host:port")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("LOADOUT_SMTP_URL has a bad port") from None
        self.hostname = parts.hostname
        self.port = port
        self.implicit_tls = parts.scheme == "smtps"
        self.username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self.timeout = timeout
        self._tls_context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file is not None else None
        )

    def __repr__(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        user = f"{self.username}:***@" if self.username else ""
        port = f":{self.port}" if self.port else ""
        return f"SmtpMailer({scheme}://{user}{self.hostname}{port})"

    async def send(self, message: EmailMessage) -> None:
        try:
            await aiosmtplib.send(
                message,
                hostname=self.hostname,
                port=self.port,
                username=self.username,
                password=self._password,
                use_tls=self.implicit_tls,
                start_tls=None if not self.implicit_tls else False,
                tls_context=self._tls_context,
                timeout=self.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refused.code for refused in exc.recipients]
            raise MailError(
                f"recipients refused: {codes}",
                retryable=all(400 <= code < 500 for code in codes),
                code=max(codes, default=None),
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise MailError(
                f"SMTP server replied {exc.code}: {exc.message}",
                retryable=not 500 <= exc.code < 600,
                code=exc.code,
            ) from exc
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected) as exc:
            raise MailError(f"SMTP connection failed: {exc}", retryable=True) from exc
        except (TimeoutError, OSError) as exc:  # SMTPTimeoutError is a TimeoutError
            raise MailError(f"SMTP unreachable: {type(exc).__name__}", retryable=True) from exc
        except aiosmtplib.SMTPException as exc:  # SMTPNotSupported: AUTH or TLS missing
            raise MailError(f"SMTP server cannot send for us: {exc}", retryable=False) from exc


class OutboxMailer(Mailer):
    """Writes each message to ``<directory>/<order>.eml`` (the laptop default:
    no mail server needed, and an operator reads what a user would get).

    A file appears whole or not at all (written aside, synced, renamed into
    place), and writing the same order again replaces its file.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_of(self, order: str) -> Path:
        return self.directory / f"{_atom(order)}.eml"

    async def send(self, message: EmailMessage) -> None:
        order = message.get(ORDER_HEADER)
        if not order:
            raise MailError(f"message without {ORDER_HEADER}", retryable=False)
        try:
            await asyncio.to_thread(self._write, self.path_of(str(order)), message.as_bytes())
        except OSError as exc:
            raise MailError(f"outbox not writable: {exc}", retryable=True) from exc

    def _write(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".eml.tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def mailer_from(
    url: str | None,
    data_dir: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ca_file: str | Path | None = None,
) -> Mailer:
    """The mailer ``LOADOUT_SMTP_URL`` asks for: SMTP, or with none the
    outbox under ``<data dir>/outbox/``."""
    if not url:
        return OutboxMailer(data_dir / "outbox")
    return SmtpMailer(url, timeout=timeout, ca_file=ca_file)
