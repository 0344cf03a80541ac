"""The notifiers file (``--notifiers-file``): which notifiers there are, where they post, what they want to hear.

Read and checked once at start, before anything runs: a mistake is a ``ConfigError`` naming the notifier and the
field, never a value that might be a secret. Credentials are read from files (a mounted Secret), so the file
itself can live in a ConfigMap. See the README for the format, with one example per type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from birdwatch.errors import ConfigError
from birdwatch.notify import Moment

from .email import SMTPServer

TYPES: Final = ("slack", "teams", "discord", "googlechat", "mattermost", "rocketchat", "webhook", "email")
# What a notifier hears when the file does not say: today's Slack moments (not every step, not every failed check).
DEFAULT_MOMENTS: Final = frozenset(Moment) - {Moment.STEP, Moment.CHECK_FAILED}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS label: it ends up in an annotation key
_COMMON = frozenset({"name", "type", "moments", "namespaces", "queue_size", "retries", "timeout"})
_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "slack": frozenset({"channel", "token_file", "api_url"}),
    "teams": frozenset({"url", "url_file"}),
    "discord": frozenset({"url", "url_file"}),
    "googlechat": frozenset({"url", "url_file"}),
    "mattermost": frozenset({"url", "url_file", "channel"}),
    "rocketchat": frozenset({"url", "url_file", "channel"}),
    "webhook": frozenset({"url", "url_file", "secret_file"}),
    "email": frozenset(
        {"host", "port", "security", "username", "password_file", "ca_file", "from", "to"},
    ),
}


@dataclass(frozen=True, kw_only=True)
class NotifierSettings:
    name: str
    type: str
    moments: frozenset[Moment] = DEFAULT_MOMENTS
    namespaces: frozenset[str] | None = None  # None: every namespace
    queue_size: int = 1000
    retries: int = 3
    timeout: float = 10.0
    url: str | None = field(default=None, repr=False)  # chat webhooks: the URL is the credential
    channel: str | None = None
    token: str | None = field(default=None, repr=False)
    api_url: str | None = None
    secret: str | None = field(default=None, repr=False)
    smtp: SMTPServer | None = None
    sender: str | None = None
    to: tuple[str, ...] = ()

    def wants(self, moment: Moment, namespace: str) -> bool:
        return moment in self.moments and (self.namespaces is None or namespace in self.namespaces)


def load_file(path: str) -> tuple[NotifierSettings, ...]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--notifiers-file {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--notifiers-file {path}: not YAML: {str(exc).splitlines()[0]}") from None
    items = raw.get("notifiers") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"--notifiers-file {path}: expected a mapping with a list 'notifiers'")
    if set(raw) - {"notifiers"}:
        raise ConfigError(f"--notifiers-file {path}: unknown top-level key(s) {sorted(set(raw) - {'notifiers'})}")
    parsed: list[NotifierSettings] = []
    for index, item in enumerate(items):
        where = f"--notifiers-file {path}: notifiers[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping")
        parsed.append(_one(item, where))
    names = [n.name for n in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--notifiers-file {path}: notifier name(s) used twice: {', '.join(twice)}")
    return tuple(parsed)


def _one(item: dict[str, Any], where: str) -> NotifierSettings:
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: 'name' must be a lower-case DNS label (a-z, 0-9, '-'), not {name!r}")
    where = f"{where} ({name})"
    kind = item.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: 'type' must be one of {', '.join(TYPES)}, not {kind!r}")
    unknown = set(item) - _COMMON - _FIELDS[kind]
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) for type {kind}: {', '.join(sorted(unknown))}")
    common: dict[str, Any] = {
        "name": name,
        "type": kind,
        "moments": _moments(item.get("moments"), where),
        "namespaces": _namespaces(item.get("namespaces"), where),
        "queue_size": _integer(item, "queue_size", 1000, where, low=1),
        "retries": _integer(item, "retries", 3, where, low=0),
        "timeout": _seconds(item, "timeout", 10.0, where),
    }
    if kind == "slack":
        token = _secret(item, "token_file", where, required=True)
        return NotifierSettings(
            **common,
            token=token,
            channel=_text(item, "channel", where) or "deployment",
            api_url=_url(item.get("api_url"), where, "api_url"),
        )
    if kind == "email":
        security = item.get("security", "starttls")
        if security not in ("starttls", "tls", "none"):
            raise ConfigError(f"{where}: 'security' must be starttls, tls or none, not {security!r}")
        host = _text(item, "host", where)
        sender = _text(item, "from", where)
        to = item.get("to")
        if isinstance(to, str):
            to = [to]
        if not host or not sender or not isinstance(to, list) or not to or not all(isinstance(t, str) for t in to):
            raise ConfigError(f"{where}: an email notifier needs 'host', 'from' and 'to' (an address or a list)")
        username = _text(item, "username", where)
        password = _secret(item, "password_file", where, required=False)
        if password and not username:
            raise ConfigError(f"{where}: 'password_file' needs 'username'")
        ca_file = _text(item, "ca_file", where)
        if ca_file and not Path(ca_file).is_file():
            raise ConfigError(f"{where}: ca_file {ca_file}: no such file")
        port = _integer(item, "port", 465 if security == "tls" else 587, where, low=1)
        smtp = SMTPServer(
            host=host, port=port, security=security, username=username, password=password, ca_file=ca_file
        )
        return NotifierSettings(**common, smtp=smtp, sender=sender, to=tuple(to))
    if ("url" in item) == ("url_file" in item):
        raise ConfigError(f"{where}: give exactly one of 'url' and 'url_file'")
    url = _url(item.get("url"), where, "url")
    from_file = _secret(item, "url_file", where, required=False)
    url = url or _url(from_file, where, "the URL in url_file")
    secret = _secret(item, "secret_file", where, required=False) if kind == "webhook" else None
    return NotifierSettings(**common, url=url, channel=_text(item, "channel", where), secret=secret)


def _moments(raw: Any, where: str) -> frozenset[Moment]:
    if raw is None:
        return DEFAULT_MOMENTS
    by_key = {m.key: m for m in Moment}
    if raw == "all":
        return frozenset(Moment)
    if not isinstance(raw, list) or not all(isinstance(m, str) and m in by_key for m in raw):
        raise ConfigError(f"{where}: 'moments' must be 'all' or a list of {', '.join(by_key)}; not {raw!r}")
    return frozenset(by_key[m] for m in raw)


def _namespaces(raw: Any, where: str) -> frozenset[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(n, str) and n for n in raw):
        raise ConfigError(f"{where}: 'namespaces' must be a non-empty list of namespace names")
    return frozenset(raw)


def _text(item: dict[str, Any], key: str, where: str) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    return value.strip()


def _integer(item: dict[str, Any], key: str, default: int, where: str, *, low: int) -> int:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where}: '{key}' must be an integer >= {low}, not {value!r}")
    return value


def _seconds(item: dict[str, Any], key: str, default: float, where: str) -> float:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}: '{key}' must be a positive number of seconds, not {value!r}")
    return float(value)


def _secret(item: dict[str, Any], key: str, where: str, *, required: bool) -> str | None:
    path = _text(item, key, where)
    if path is None:
        if required:
            raise ConfigError(f"{where}: '{key}' is required")
        return None
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: {key} {path}: {exc.strerror or exc}") from None
    if not value:
        raise ConfigError(f"{where}: {key} {path} is empty")
    return value


def _url(raw: Any, where: str, what: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not re.match(r"^https?://[^/\s]+", raw.strip()):
        # A webhook URL may be a credential: say that it is wrong, never what it is.
        raise ConfigError(f"{where}: {what} must be an http:// or https:// URL")
    return raw.strip()


def slack_from_env(*, token: str | None, channel: str, api_url: str | None) -> NotifierSettings | None:
    """Today's Slack settings ($SLACK_API_TOKEN, --slack-channel, --slack-api-url) as the notifier named ``slack``."""
    if token is None or not token.strip():
        return None
    return NotifierSettings(name="slack", type="slack", token=token.strip(), channel=channel, api_url=api_url)
