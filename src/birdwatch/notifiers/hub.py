"""The notifier the canaries talk to: hands each notice to every configured notifier that wants it.

A notifier wants a notice when the notice's moment is among its ``moments``, the BirdWatch's namespace passes its
``namespaces`` filter, and, when the BirdWatch lists notifiers in ``spec.notify``, its name is in that list (the
namespace filter still applies: it is the operator's say over which teams may use a channel).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import structlog

from birdwatch.kube import Kube
from birdwatch.notify import Notice, Notifier, NullNotifier

from . import discord, email, googlechat, mattermost, rocketchat, teams
from .delivery import Delivery, OnResult, Sender
from .http import JSONWebhookSender
from .settings import NotifierSettings
from .threads import AnnotationThreads

log = structlog.get_logger(__name__)


class Hub:
    def __init__(self, notifiers: Sequence[tuple[NotifierSettings, Delivery]]) -> None:
        self._notifiers = tuple(notifiers)
        self._names = frozenset(s.name for s, _ in notifiers)
        self._unknown: set[tuple[str, str, str]] = set()  # (namespace, birdwatch, name) already warned about

    def __repr__(self) -> str:
        return f"Hub({[d for _, d in self._notifiers]!r})"

    def notify(self, notice: Notice) -> None:
        if notice.targets is not None:
            self._warn_unknown(notice)
        for settings, delivery in self._notifiers:
            if notice.targets is not None and settings.name not in notice.targets:
                continue
            if settings.wants(notice.moment, notice.namespace):
                delivery.notify(notice)

    def _warn_unknown(self, notice: Notice) -> None:
        for name in notice.targets or ():
            key = (notice.namespace, notice.name, name)
            if name not in self._names and key not in self._unknown:
                self._unknown.add(key)
                log.warning(
                    "spec.notify names a notifier that is not configured",
                    notifier=name,
                    namespace=notice.namespace,
                    birdwatch=notice.name,
                )

    async def start(self) -> None:
        for _, delivery in self._notifiers:
            await delivery.start()

    async def close(self, *, timeout: float = 5.0) -> None:
        # Side by side: shutdown takes at most ``timeout``, however many notifiers are slow.
        await asyncio.gather(*(d.close(timeout=timeout) for _, d in self._notifiers))


def build(
    settings: Sequence[NotifierSettings], *, kube: Kube | None = None, on_result: OnResult | None = None
) -> Notifier:
    """The notifiers the settings describe, behind one Hub; a NullNotifier when there are none."""
    if not settings:
        log.info("notifications disabled: no notifier configured")
        return NullNotifier()
    made = [(s, _make(s, kube=kube, on_result=on_result)) for s in settings]
    log.info("notifiers configured", notifiers=[f"{s.name} ({s.type})" for s in settings])
    return Hub(made)


def _make(s: NotifierSettings, *, kube: Kube | None, on_result: OnResult | None) -> Delivery:
    # slack_sdk (3 MB of RSS) and cloudevents (2 MB) are imported only when a notifier of theirs is configured.
    if s.type == "slack":
        from .slack import SlackNotifier

        assert s.token is not None
        return SlackNotifier(
            name=s.name,
            token=s.token,
            channel=s.channel or "deployment",
            base_url=s.api_url,
            queue_size=s.queue_size,
            max_retries=s.retries,
            timeout=s.timeout,
            threads=AnnotationThreads(kube, notifier=s.name) if kube is not None else None,
            on_result=on_result,
        )
    if s.type == "email":
        assert s.smtp is not None
        assert s.sender is not None
        sender: Sender = email.EmailSender(server=s.smtp, sender=s.sender, to=s.to, timeout=s.timeout)
    elif s.type == "webhook":
        from . import webhook

        assert s.url is not None
        sender = webhook.WebhookSender(url=s.url, secret=s.secret, timeout=s.timeout)
    else:
        assert s.url is not None
        sender = JSONWebhookSender(kind=s.type, url=s.url, timeout=s.timeout, body=_body(s), query=_QUERIES.get(s.type))
    return Delivery(
        name=s.name,
        sender=sender,
        queue_size=s.queue_size,
        max_retries=s.retries,
        timeout=s.timeout,
        on_result=on_result,
    )


_QUERIES: Final[Mapping[str, Callable[[Notice], dict[str, str]]]] = {
    "discord": discord.query,
    "googlechat": googlechat.query,
}


def _body(s: NotifierSettings) -> Callable[[Notice], dict[str, Any]]:
    channel = s.channel
    if s.type == "mattermost":
        return lambda notice: mattermost.body(notice, channel=channel)
    if s.type == "rocketchat":
        return lambda notice: rocketchat.body(notice, channel=channel)
    bodies: Mapping[str, Callable[[Notice], dict[str, Any]]] = {
        "teams": teams.body,
        "discord": discord.body,
        "googlechat": googlechat.body,
    }
    return bodies[s.type]


def make_notifier(*, token: str | None, channel: str, base_url: str | None = None) -> Notifier:
    """Today's Slack settings alone: a SlackNotifier posting to ``channel``, or a NullNotifier without a token."""
    if token is None or not token.strip():
        log.info("slack notifications disabled: no token configured")
        return NullNotifier()
    from .slack import SlackNotifier

    return SlackNotifier(token=token, channel=channel, base_url=base_url)
