"""Email through SMTP, by aiosmtplib: STARTTLS (the default), implicit TLS or none; AUTH when a user is given.

Each notice is one message (plain text, with an HTML alternative coloured by outcome) on a connection of its own:
rollouts are minutes apart, and a connection held open would only time out in between. SMTP's own answers decide
retries: 4xx (and a dropped connection or a timeout) is tried again, 5xx (a refused login, a refused recipient)
is not. The password is never logged.

aiosmtplib is imported on the first message, not with this module: the settings import ``SMTPServer`` from here at
every start, and a controller without an email notifier would carry the library (0.3 MB of RSS) for nothing.
"""

from __future__ import annotations

import html
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from birdwatch.notify import Notice

from .delivery import Verdict, detail
from .text import LOOKS, facts, message, plain, title


@dataclass(frozen=True, kw_only=True)
class SMTPServer:
    host: str
    port: int = 587
    security: str = "starttls"  # starttls, tls (implicit, usually port 465) or none
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # a private CA for the server's certificate; default: the system's


def compose(notice: Notice, *, sender: str, to: tuple[str, ...]) -> EmailMessage:
    look = LOOKS[notice.moment]
    mail = EmailMessage()
    mail["Subject"] = f"[birdwatch] {look.icon} {title(notice)}"
    mail["From"] = sender
    mail["To"] = ", ".join(to)
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain="birdwatch.otomato.link")
    mail["X-Birdwatch-Moment"] = notice.moment.value
    mail.set_content(plain(notice))
    rows = "".join(
        f"<tr><th align='left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts(notice)
    )
    mail.add_alternative(
        f"<html><body><h3 style='color:#{look.colour:06X}'>{look.icon} {html.escape(title(notice))}</h3>"
        f"<p>{html.escape(message(notice))}</p><table>{rows}</table>"
        f"<p style='color:#888'>{html.escape(notice.moment.value)}</p></body></html>",
        subtype="html",
    )
    return mail


class EmailSender:
    kind = "email"

    def __init__(self, *, server: SMTPServer, sender: str, to: tuple[str, ...], timeout: float) -> None:
        self._server = server
        self._from = sender
        self._to = to
        self._timeout = timeout
        self._tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"EmailSender(host={self._server.host!r}, port={self._server.port}, to={self._to!r})"

    async def open(self) -> None:
        if self._server.security != "none":
            # Built once: loading a CA bundle is file I/O the event loop should not repeat per message.
            self._tls = ssl.create_default_context(cafile=self._server.ca_file)

    async def aclose(self) -> None:
        pass

    async def send(self, notice: Notice) -> None:
        import aiosmtplib

        server = self._server
        await aiosmtplib.send(
            compose(notice, sender=self._from, to=self._to),
            hostname=server.host,
            port=server.port,
            username=server.username,
            password=server.password,
            use_tls=server.security == "tls",
            start_tls=server.security == "starttls",
            tls_context=self._tls,
            timeout=self._timeout,
        )

    def judge(self, exc: BaseException) -> Verdict:
        import aiosmtplib  # send() has imported it: a look-up in sys.modules

        secrets = (self._server.password,) if self._server.password else ()
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return Verdict(
                retryable=400 <= exc.code < 500,
                fields={"error": f"smtp_{exc.code}", "status": exc.code, "detail": detail(exc, *secrets)},
            )
        if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError):
            return Verdict(
                retryable=True, fields={"error": "TimeoutError", "detail": f"no answer within {self._timeout:g}s"}
            )
        return Verdict(
            retryable=isinstance(exc, aiosmtplib.SMTPException | OSError),
            fields={"error": type(exc).__name__, "detail": detail(exc, *secrets)},
        )
