"""A real SMTP server for the email notifier's tests: aiosmtpd on a loopback port in the test's event loop, with
STARTTLS required (a certificate from the envtest CA) and AUTH required after it, as a mail relay has them.

Every accepted message is parsed into ``messages`` (an ``email.message.EmailMessage``) with its envelope; every
login attempt is in ``logins`` as (user, accepted) — never with the password.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from birdwatch_sandbox.envtest.pki import CertificateAuthority


@dataclass(frozen=True)
class Delivered:
    sender: str
    recipients: list[str]
    message: EmailMessage
    tls: bool  # the message came over a connection upgraded by STARTTLS
    user: str | None


class SMTPServer:
    def __init__(self, folder: Path, *, user: str, password: str, fail_with: int | None = None) -> None:
        self.ca = CertificateAuthority(folder)
        pair = self.ca.issue("smtp", common_name="localhost", server=True)
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(pair.cert, pair.key)
        self.user, self._password = user, password
        self.fail_with = fail_with  # an SMTP code to answer DATA with (e.g. 451), while set
        self.messages: list[Delivered] = []
        self.logins: list[tuple[str, bool]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def ca_file(self) -> Path:
        return self.ca.cert

    async def start(self) -> SMTPServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(
                self,
                hostname="localhost",
                tls_context=self._tls,
                require_starttls=True,
                auth_required=True,
                auth_require_tls=True,
                authenticator=self._authenticate,
            ),
            "127.0.0.1",
            0,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> SMTPServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = data.login.decode()
        ok = user == self.user and data.password.decode() == self._password
        self.logins.append((user, ok))
        if not ok:
            # handled=False: aiosmtpd answers 535 itself (True would leave the client waiting for an answer).
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=user)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd's)
        if self.fail_with is not None:
            return f"{self.fail_with} injected failure"
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(
            Delivered(
                sender=str(envelope.mail_from),
                recipients=list(envelope.rcpt_tos),
                message=parsed,
                tls=session.ssl is not None,
                user=session.auth_data if isinstance(session.auth_data, str) else None,
            )
        )
        return "250 Message accepted for delivery"

    async def wait_for(self, n: int, *, timeout: float = 10.0) -> list[Delivered]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < n:
                await asyncio.sleep(0.02)
        return list(self.messages)
