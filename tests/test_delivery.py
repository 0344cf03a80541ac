"""One notifier's queue, worker and retries, against the local services of hookfakes over real sockets: what is
retried (5xx, 429 after its Retry-After, silence) and what is not (a refused signature, a wrong token), that a
retried CloudEvent keeps its id and signature, and that what fails is logged without the credential."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from birdwatch.notifiers.delivery import Delivery
from birdwatch.notifiers.discord import body as discord_body
from birdwatch.notifiers.discord import query as discord_query
from birdwatch.notifiers.email import EmailSender, SMTPServer
from birdwatch.notifiers.http import JSONWebhookSender
from birdwatch.notifiers.teams import body as teams_body
from birdwatch.notifiers.webhook import WebhookSender
from birdwatch.notify import Moment, Notice
from hookfakes import CloudEventsReceiver, FakeDiscord, FakeTeams
from smtpserver import SMTPServer as RealSMTPServer

SECRET = "hmac-secret-for-delivery-tests"
SIG = "teamsSIGforDELIVERYtests0123"
Results = list[tuple[str, str]]


def notice(moment: Moment = Moment.PROMOTED) -> Notice:
    return Notice(
        moment=moment,
        namespace="shop",
        name="reviews",
        service="reviews",
        canary_version="v2",
        weight=100,
        message="canary v2 promoted to production",
        value=0.01,
        baseline=0.02,
        uid="0b7c6b0e-0000-4000-8000-00000000000a",
        generation=1,
        next_step="none: the canary is production",
    )


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as entries:
        yield entries


@pytest.fixture
async def receiver() -> AsyncIterator[CloudEventsReceiver]:
    fake = CloudEventsReceiver(secret=SECRET)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def teams() -> AsyncIterator[FakeTeams]:
    fake = FakeTeams(sig=SIG)
    await fake.start()
    yield fake
    await fake.close()


def webhook(url: str, *, secret: str = SECRET, results: Results, retries: int = 3, timeout: float = 5) -> Delivery:
    return Delivery(
        name="hooks",
        sender=WebhookSender(url=url, secret=secret, timeout=timeout),
        max_retries=retries,
        timeout=timeout,
        on_result=lambda name, result: results.append((name, result)),
        backoff=(0.1,),
    )


async def test_a_server_error_is_retried_with_the_same_event_and_signature(receiver: CloudEventsReceiver) -> None:
    results: Results = []
    delivery = webhook(receiver.url, results=results)
    await delivery.start()
    receiver.fail_next(2, status=503)
    delivery.notify(notice())
    [accepted] = await receiver.wait_for(1)
    await delivery.close()

    assert receiver.requests == 3
    assert results == [("hooks", "retried"), ("hooks", "retried"), ("hooks", "sent")]
    [event] = receiver.events
    assert event.get_type() == "link.otomato.birdwatch.rollout.promoted"
    assert accepted.headers["Content-Type"] == "application/cloudevents+json"
    assert accepted.headers["X-Birdwatch-Signature-256"].startswith("sha256=")


async def test_a_refused_signature_is_not_retried_and_the_secret_is_not_logged(
    receiver: CloudEventsReceiver, logs: list[MutableMapping[str, Any]]
) -> None:
    results: Results = []
    delivery = webhook(receiver.url, secret="the-wrong-secret", results=results)
    await delivery.start()
    delivery.notify(notice(Moment.ROLLED_BACK))
    await receiver.wait_for_requests(1)
    await delivery.close()

    assert receiver.refused == [401]
    assert results == [("hooks", "failed")]
    [failure] = [e for e in logs if e["event"] == "webhook notification failed"]
    assert (failure["status"], failure["moment"], failure["notifier"]) == (401, "RolledBack", "hooks")
    assert "the-wrong-secret" not in repr(logs)


async def test_silence_is_bounded_by_the_timeout_and_retried(receiver: CloudEventsReceiver) -> None:
    results: Results = []
    delivery = webhook(receiver.url, results=results, retries=1, timeout=0.5)
    await delivery.start()
    receiver.hang(30)
    started = time.perf_counter()
    delivery.notify(notice())
    await receiver.wait_for_requests(2, timeout=5)
    receiver.hang(0)
    await delivery.close(timeout=3)

    assert time.perf_counter() - started < 4
    assert results == [("hooks", "retried"), ("hooks", "failed")]


async def test_a_wrong_teams_signature_is_refused_without_the_url_in_the_log(
    teams: FakeTeams, logs: list[MutableMapping[str, Any]]
) -> None:
    results: Results = []
    wrong = teams.url.replace(SIG, "notTHEsignature0123")
    delivery = Delivery(
        name="ops",
        sender=JSONWebhookSender(kind="teams", url=wrong, timeout=5, body=teams_body),
        on_result=lambda name, result: results.append((name, result)),
    )
    await delivery.start()
    delivery.notify(notice())
    await teams.wait_for_requests(1)
    await delivery.close()

    assert results == [("ops", "failed")]
    [failure] = [e for e in logs if e["event"] == "teams notification failed"]
    assert failure["status"] == 401
    assert "notTHEsignature0123" not in repr(logs)
    assert "/workflows/" not in repr(logs)


async def test_discords_rate_limit_is_waited_out_then_delivered() -> None:
    results: Results = []
    async with FakeDiscord(token="discordTOKEN0123") as discord:
        assert isinstance(discord, FakeDiscord)
        delivery = Delivery(
            name="discord",
            sender=JSONWebhookSender(
                kind="discord", url=discord.url, timeout=5, body=discord_body, query=discord_query
            ),
            on_result=lambda name, result: results.append((name, result)),
            backoff=(0.1,),
        )
        await delivery.start()
        discord.rate_limit_next(1, retry_after=1.0)
        started = time.perf_counter()
        delivery.notify(notice())
        await discord.wait_for(1)
        waited = time.perf_counter() - started
        await delivery.close()
    assert waited >= 1.0, f"Retry-After 1 not honoured ({waited:.2f}s)"
    assert results == [("discord", "retried"), ("discord", "sent")]


def mail(server: RealSMTPServer, *, password: str, results: Results) -> Delivery:
    smtp = SMTPServer(
        host="127.0.0.1",
        port=server.port,
        security="starttls",
        username="bw",
        password=password,
        ca_file=str(server.ca_file),
    )
    return Delivery(
        name="mail",
        sender=EmailSender(server=smtp, sender="bw@example.com", to=("team@example.com",), timeout=5),
        on_result=lambda name, result: results.append((name, result)),
        backoff=(0.1,),
    )


async def test_an_smtp_4xx_is_retried_and_a_refused_login_is_not(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    async with RealSMTPServer(tmp_path, user="bw", password="right-password") as server:
        assert isinstance(server, RealSMTPServer)
        results: Results = []
        server.fail_with = 451
        delivery = mail(server, password="right-password", results=results)
        await delivery.start()
        delivery.notify(notice())
        while not results:
            await asyncio.sleep(0.02)
        server.fail_with = None
        await server.wait_for(1)
        await delivery.close()
        assert results == [("mail", "retried"), ("mail", "sent")]

        refused: Results = []
        delivery = mail(server, password="wrong-password-123", results=refused)
        await delivery.start()
        delivery.notify(notice(Moment.ROLLED_BACK))
        await delivery.close()
        assert refused == [("mail", "failed")]
        assert server.logins[-1] == ("bw", False)
    [failure] = [e for e in logs if e["event"] == "email notification failed"]
    assert failure["status"] == 535
    assert "wrong-password-123" not in repr(logs)
