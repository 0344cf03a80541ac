"""Slack notifications, as the people on the deployment channel see them, against the local Slack of slackfake.

Whatever Slack does (rate limits, 5xx, a revoked token, silence, slowness), a rollout must neither wait for it nor
fail because of it, and the bot token must never show up in a log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import pytest
import structlog

from birdwatch.notifiers.hub import make_notifier
from birdwatch.notifiers.slack import SlackNotifier
from birdwatch.notifiers.threads import MemoryThreads
from birdwatch.notify import Moment, Notice, NullNotifier
from slackfake import FakeSlack

TOKEN = "xoxb-1111111111-2222222222-birdwatchTESTtoken0123456789"
WRONG_TOKEN = "xoxb-3333333333-4444444444-revokedTESTtoken9876543210"
CHANNEL = "deployment"

LogEntries = list[MutableMapping[str, Any]]
MakeNotifier = Callable[..., Awaitable[SlackNotifier]]


def notice(moment: Moment = Moment.UNHEALTHY, **changes: Any) -> Notice:
    fields: dict[str, Any] = {
        "moment": moment,
        "namespace": "shop",
        "name": "reviews",
        "service": "reviews-vs",
        "canary_version": "v2.3.1",
        "weight": 20,
        "message": "error rate 0.31 exceeded baseline 0.02 by more than 0.1",
        "value": 0.31,
        "baseline": 0.02,
    }
    fields.update(changes)
    return Notice(**fields)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # slack_sdk reads *_PROXY itself (it ignores NO_PROXY): the loopback fake must be reached directly.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack(token=TOKEN, channels=[CHANNEL]) as fake:
        yield fake


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[LogEntries]:
    """birdwatch's structlog events; slack_sdk's own (stdlib) logging is captured at DEBUG by caplog meanwhile."""
    caplog.set_level(logging.DEBUG, logger="slack_sdk")
    with structlog.testing.capture_logs() as entries:
        yield entries


@pytest.fixture
async def notifiers(slack: FakeSlack) -> AsyncIterator[MakeNotifier]:
    """Makes started SlackNotifiers (for the fake Slack unless told otherwise) and closes them at the end, so that
    no worker outlives its test."""
    made: list[SlackNotifier] = []

    async def make(*, start: bool = True, **kwargs: Any) -> SlackNotifier:
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("channel", CHANNEL)
        kwargs.setdefault("base_url", slack.base_url)
        notifier = SlackNotifier(**kwargs)
        made.append(notifier)
        if start:
            await notifier.start()
        return notifier

    yield make
    for notifier in made:
        await notifier.close(timeout=0)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port where nothing listens: bound (so no one else gets it) but never listening, so connecting
    is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def failures(entries: LogEntries) -> LogEntries:
    return [e for e in entries if e["event"] == "slack notification failed"]


def assert_no_token(entries: LogEntries, caplog: pytest.LogCaptureFixture, *tokens: str) -> None:
    for token in tokens or (TOKEN, WRONG_TOKEN):
        assert not [e for e in entries if token in repr(e)], "a structlog event holds the token"
        assert token not in caplog.text, "a stdlib log record holds the token"


async def test_a_notice_arrives_in_the_channel_with_version_weight_and_message(
    slack: FakeSlack, notifiers: MakeNotifier, logs: LogEntries, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = await notifiers()

    notifier.notify(notice())
    await notifier.close()  # close() delivers what is queued

    [message] = slack.messages
    assert message.channel == CHANNEL
    assert message.content_type == "application/json"
    assert message.text == (
        ":warning: *shop/reviews*: canary v2.3.1 of reviews-vs at 20% — canary unhealthy. "
        "error rate 0.31 exceeded baseline 0.02 by more than 0.1 (value 0.31 vs baseline 0.02)"
    )
    assert message.blocks is not None
    section, context = message.blocks
    assert section == {"type": "section", "text": {"type": "mrkdwn", "text": message.text}}
    assert context["type"] == "context"
    [element] = context["elements"]
    assert element["type"] == "mrkdwn"
    for part in ("CanaryUnhealthy", "shop/reviews", "reviews-vs", "v2.3.1", "20%"):
        assert part in element["text"]
    assert not failures(logs)
    assert_no_token(logs, caplog)


async def test_every_moment_is_posted_in_order_with_its_emoji(slack: FakeSlack, notifiers: MakeNotifier) -> None:
    notifier = await notifiers()
    emoji = {
        Moment.STARTED: ":hatching_chick:",
        Moment.UNHEALTHY: ":warning:",
        Moment.FROZEN: ":ice_cube:",
        Moment.ROLLED_BACK: ":rewind:",
        Moment.FAILED: ":x:",
        Moment.PROMOTED: ":rocket:",
    }

    for weight, moment in enumerate(emoji, start=1):
        notifier.notify(notice(moment, weight=weight, value=None, baseline=None, message=f"step {weight}"))

    messages = await slack.wait_for_messages(len(emoji))
    for weight, (message, (moment, icon)) in enumerate(zip(messages, emoji.items(), strict=True), start=1):
        assert message.text is not None
        assert message.text.startswith(f"{icon} *shop/reviews*: canary v2.3.1 of reviews-vs at {weight}% — ")
        assert message.text.endswith(f". step {weight}")  # neither value nor baseline known: none shown
        assert moment.value in str(message.blocks)


async def test_text_from_the_cluster_cannot_turn_into_slack_markup(slack: FakeSlack, notifiers: MakeNotifier) -> None:
    notifier = await notifiers()

    notifier.notify(notice(message="p99 latency > 250ms & <!channel> rising", value=0.9, baseline=None))

    [message] = await slack.wait_for_messages(1)
    assert message.text is not None
    assert message.text.endswith("p99 latency &gt; 250ms &amp; &lt;!channel&gt; rising (value 0.9)")


async def test_rate_limited_is_retried_after_retry_after_then_delivered(
    slack: FakeSlack, notifiers: MakeNotifier, logs: LogEntries
) -> None:
    notifier = await notifiers()
    slack.rate_limit_next(1, retry_after=1)

    notifier.notify(notice())

    [message] = await slack.wait_for_messages(1, timeout=6)
    assert "v2.3.1" in (message.text or "")
    limited, delivered = slack.requests
    assert (limited.status, limited.error) == (429, "ratelimited")
    assert delivered.status == 200
    assert delivered.at - limited.at >= 1.0, "Retry-After: 1 was not honoured"
    assert not failures(logs)


async def test_server_errors_are_retried_up_to_max_retries_then_dropped(
    slack: FakeSlack, notifiers: MakeNotifier, logs: LogEntries
) -> None:
    notifier = await notifiers(max_retries=1)
    # First notice: 500, then 500 on its one retry -> given up. Second notice: 503, then delivered on its retry.
    slack.fail_next(2, status=500)
    notifier.notify(notice(Moment.FROZEN, weight=30))
    await slack.wait_for_requests(2, timeout=6)
    slack.fail_next(1, status=503)
    notifier.notify(notice(Moment.PROMOTED, weight=100))

    [message] = await slack.wait_for_messages(1, timeout=6)
    assert message.text is not None
    assert message.text.startswith(":rocket:")
    assert [r.status for r in slack.requests] == [500, 500, 503, 200]
    [failure] = failures(logs)
    assert failure["log_level"] == "warning"
    assert failure["moment"] == "Frozen"
    assert (failure["namespace"], failure["birdwatch"]) == ("shop", "reviews")
    assert failure["status"] == 500
    assert failure["slack_error"] == "internal_error"


async def test_an_invalid_token_is_logged_not_raised_and_later_notices_are_still_tried(
    slack: FakeSlack, notifiers: MakeNotifier, logs: LogEntries, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = await notifiers(token=WRONG_TOKEN)

    notifier.notify(notice(Moment.STARTED, weight=10))
    notifier.notify(notice(Moment.UNHEALTHY, weight=20))
    await notifier.close()

    assert slack.messages == []
    assert [(r.status, r.error) for r in slack.requests] == [(200, "invalid_auth")] * 2
    assert [(f["moment"], f["slack_error"], f["log_level"]) for f in failures(logs)] == [
        ("RolloutStarted", "invalid_auth", "warning"),
        ("CanaryUnhealthy", "invalid_auth", "warning"),
    ]
    assert_no_token(logs, caplog)


async def test_an_unknown_channel_is_logged_and_the_next_notice_still_goes(
    slack: FakeSlack, notifiers: MakeNotifier, logs: LogEntries
) -> None:
    lost = await notifiers(channel="no-such-channel")
    kept = await notifiers()

    lost.notify(notice(weight=10))
    await lost.close()
    kept.notify(notice(weight=20))

    [message] = await slack.wait_for_messages(1)
    assert "at 20%" in (message.text or "")
    [failure] = failures(logs)
    assert (failure["slack_error"], failure["channel"]) == ("channel_not_found", "no-such-channel")


async def test_unreachable_slack_never_holds_up_notify_and_close_keeps_its_timeout(
    dead_port: int, notifiers: MakeNotifier, logs: LogEntries
) -> None:
    # max_retries=3: the worker would be retrying with backoff for seconds, well past close()'s timeout.
    notifier = await notifiers(base_url=f"http://127.0.0.1:{dead_port}/api/", max_retries=3)

    started = time.perf_counter()
    notifier.notify(notice())
    assert time.perf_counter() - started < 0.05

    started = time.perf_counter()
    await notifier.close(timeout=1.0)
    elapsed = time.perf_counter() - started
    assert 0.9 <= elapsed < 2.5, f"close(timeout=1.0) took {elapsed:.2f}s"
    [unsent] = [e for e in logs if e["event"] == "slack notifications not sent before shutdown"]
    assert unsent["unsent"] == 1


async def test_unreachable_slack_is_logged_and_the_worker_goes_on(
    dead_port: int, notifiers: MakeNotifier, logs: LogEntries, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = await notifiers(base_url=f"http://127.0.0.1:{dead_port}/api/", max_retries=0)

    notifier.notify(notice(Moment.STARTED))
    notifier.notify(notice(Moment.FAILED))
    await notifier.close(timeout=5)

    assert [(f["moment"], f["slack_error"]) for f in failures(logs)] == [
        ("RolloutStarted", "ClientConnectorError"),
        ("RolloutFailed", "ClientConnectorError"),
    ]
    assert f"127.0.0.1:{dead_port}" in failures(logs)[0]["detail"]
    assert not [e for e in logs if e["event"] == "slack notifications not sent before shutdown"]
    assert_no_token(logs, caplog)


async def test_a_slow_slack_never_blocks_notify(slack: FakeSlack, notifiers: MakeNotifier) -> None:
    notifier = await notifiers()
    slack.delay(0.5)
    notifier.notify(notice(weight=1))
    await slack.wait_for_requests(1, answered=False)  # Slack is now sitting on the first notice

    started = time.perf_counter()
    for weight in range(2, 102):
        notifier.notify(notice(weight=weight))
    elapsed = time.perf_counter() - started

    # Typically well under a millisecond; generous because the machines running this are shared.
    assert elapsed < 0.05, f"100 notify() calls took {elapsed * 1000:.1f} ms"
    [first] = await slack.wait_for_messages(1)  # the slow answer came, and nothing got stuck meanwhile
    assert "at 1%" in (first.text or "")
    started = time.perf_counter()
    await notifier.close(timeout=0.2)
    assert time.perf_counter() - started < 2.0


async def test_a_full_queue_drops_the_oldest_notices(
    slack: FakeSlack, notifiers: MakeNotifier, logs: LogEntries
) -> None:
    notifier = await notifiers(queue_size=3, start=False)

    for weight in (10, 20, 30, 40, 50):
        notifier.notify(notice(weight=weight))
    await notifier.start()
    await notifier.close()

    assert [m.text is not None and m.text.split(" at ")[1][:3] for m in slack.messages] == ["30%", "40%", "50%"]
    drops = [e for e in logs if e["event"] == "slack notification queue full, dropped the oldest notice"]
    assert [(d["dropped"], d["log_level"], d["queue_size"]) for d in drops] == [(1, "warning", 3), (2, "warning", 3)]
    assert notifier.dropped == 2


async def test_notices_after_close_are_not_sent_and_nothing_raises(
    slack: FakeSlack, notifiers: MakeNotifier, logs: LogEntries
) -> None:
    notifier = await notifiers()
    await notifier.close()

    notifier.notify(notice())
    await notifier.close()  # twice is fine
    await asyncio.sleep(0.1)

    assert slack.request_count == 0
    assert [e["event"] for e in logs] == ["slack notifier is closed, notification not sent"]


async def test_the_token_never_appears_in_logs_or_repr(
    slack: FakeSlack,
    dead_port: int,
    notifiers: MakeNotifier,
    logs: LogEntries,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every failure path at once, with slack_sdk's own debug logging on: invalid_auth, 5xx, 429, refused connection.
    wrong = await notifiers(token=WRONG_TOKEN, max_retries=0)
    dead = await notifiers(token=WRONG_TOKEN, base_url=f"http://127.0.0.1:{dead_port}/api/", max_retries=0)
    slack.rate_limit_next(1, retry_after=0)
    slack.fail_next(1, status=500)
    for _ in range(3):
        wrong.notify(notice())
    dead.notify(notice())
    await wrong.close()
    await dead.close()

    # The two notifiers' workers run side by side: their failures interleave in any order.
    assert sorted(f["slack_error"] for f in failures(logs)) == [
        "ClientConnectorError",
        "internal_error",
        "invalid_auth",
        "ratelimited",
    ]
    assert caplog.records, "slack_sdk's debug logging was expected to run"
    assert_no_token(logs, caplog, WRONG_TOKEN)
    assert WRONG_TOKEN not in repr(wrong)


async def test_without_a_token_nothing_is_sent(slack: FakeSlack, logs: LogEntries) -> None:
    for token in (None, "", "   "):
        notifier = make_notifier(token=token, channel=CHANNEL, base_url=slack.base_url)
        assert isinstance(notifier, NullNotifier)
        await notifier.start()
        notifier.notify(notice())
        await notifier.close()
    await asyncio.sleep(0.1)

    assert slack.request_count == 0
    assert {e["event"] for e in logs} == {"slack notifications disabled: no token configured"}


async def test_with_a_token_make_notifier_posts_to_the_channel(slack: FakeSlack) -> None:
    notifier = make_notifier(token=TOKEN, channel=CHANNEL, base_url=slack.base_url)
    assert isinstance(notifier, SlackNotifier)
    await notifier.start()
    try:
        notifier.notify(notice(Moment.PROMOTED, weight=100))
        [message] = await slack.wait_for_messages(1)
    finally:
        await notifier.close()
    assert message.channel == CHANNEL
    assert (message.text or "").startswith(":rocket: *shop/reviews*: canary v2.3.1 of reviews-vs at 100% — promoted")


async def test_the_fake_speaks_slacks_form_and_json_protocol(slack: FakeSlack) -> None:
    from slack_sdk.errors import SlackApiError
    from slack_sdk.web.async_client import AsyncWebClient

    client = AsyncWebClient(token=TOKEN, base_url=slack.base_url)
    assert (await client.auth_test())["user_id"] == "U0BIRDWATCH"
    form = await client.api_call(
        "chat.postMessage", data={"channel": "#deployment", "text": "form", "blocks": '[{"type": "divider"}]'}
    )
    sent = await client.chat_postMessage(channel="deployment", text="json")
    assert form["ts"] == "1700000000.000100"
    assert sent["ts"] == "1700000000.000101"
    assert form["channel"] == sent["channel"]
    assert sent["channel"].startswith("C")
    assert [(m.channel, m.text, m.blocks, m.content_type) for m in slack.messages] == [
        ("deployment", "form", [{"type": "divider"}], "application/x-www-form-urlencoded"),
        ("deployment", "json", None, "application/json"),
    ]
    with pytest.raises(SlackApiError) as bad_token:
        await AsyncWebClient(token="xoxb-nope", base_url=slack.base_url).chat_postMessage(
            channel="deployment", text="x"
        )
    assert bad_token.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as no_text, pytest.warns(UserWarning, match="`text` argument is missing"):
        await client.chat_postMessage(channel="deployment")
    assert no_text.value.response["error"] == "no_text"


async def test_a_cancelled_close_still_stops_the_worker(dead_port: int, notifiers: MakeNotifier) -> None:
    notifier = await notifiers(base_url=f"http://127.0.0.1:{dead_port}/api/", max_retries=3)
    notifier.notify(notice())
    closing = asyncio.create_task(notifier.close(timeout=30))
    await asyncio.sleep(0.1)

    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing

    assert not [t for t in asyncio.all_tasks() if t.get_name() == "birdwatch-slack-notifier"]


async def test_a_birdwatch_without_a_readable_spec_is_still_announced_sensibly(
    slack: FakeSlack, notifiers: MakeNotifier
) -> None:
    notifier = await notifiers()

    notifier.notify(notice(Moment.FAILED, service="", canary_version="", weight=0, message="spec.metric is missing"))

    [message] = await slack.wait_for_messages(1)
    assert message.text == ":x: *shop/reviews*: rollout failed. spec.metric is missing (value 0.31 vs baseline 0.02)"


# --- a thread per rollout ------------------------------------------------------------------------------------------


async def test_a_rollout_is_one_thread_whose_first_message_is_updated_at_the_end(
    slack: FakeSlack, notifiers: MakeNotifier
) -> None:
    notifier = await notifiers()
    rollout = {"uid": "8d3e6a52-0000-4000-8000-000000000001", "generation": 2}
    notifier.notify(notice(Moment.STARTED, weight=0, **rollout))
    notifier.notify(notice(Moment.STEP, weight=10, **rollout))
    notifier.notify(notice(Moment.CHECK_FAILED, weight=10, **rollout))
    notifier.notify(notice(Moment.UNHEALTHY, weight=10, **rollout))
    notifier.notify(notice(Moment.ROLLED_BACK, weight=0, **rollout))
    # Another BirdWatch, and the same one's next generation: threads of their own.
    notifier.notify(notice(Moment.STARTED, name="ratings", **rollout))
    notifier.notify(notice(Moment.STARTED, weight=0, **{**rollout, "generation": 3}))
    await notifier.close()

    parent, *replies, ratings, next_generation = slack.messages
    assert parent.thread_ts is None
    assert [r.thread_ts for r in replies] == [parent.ts] * 4
    assert [r.text is not None and r.text.split(" ", 1)[0] for r in replies] == [
        ":arrow_up:",
        ":mag:",
        ":warning:",
        ":rewind:",
    ]
    assert (ratings.thread_ts, next_generation.thread_ts) == (None, None)
    [update] = slack.updates
    assert update.ts == parent.ts
    assert update.text == replies[-1].text
    assert (update.text or "").startswith(":rewind: *shop/reviews*: canary v2.3.1 of reviews-vs at 0% — rolled back")


async def test_a_new_notifier_with_the_same_store_goes_on_in_the_same_thread(slack: FakeSlack) -> None:
    # What a restart does with the annotation on the BirdWatch (tests/test_notifiers.py runs the real one).
    store = MemoryThreads()
    rollout = {"uid": "8d3e6a52-0000-4000-8000-000000000002", "generation": 1}
    for moments in ((Moment.STARTED, Moment.STEP), (Moment.STEP, Moment.PROMOTED)):
        notifier = SlackNotifier(token=TOKEN, channel=CHANNEL, base_url=slack.base_url, threads=store)
        await notifier.start()
        for moment in moments:
            notifier.notify(notice(moment, **rollout))
        await notifier.close()

    parent, *replies = slack.messages
    assert [r.thread_ts for r in replies] == [parent.ts] * 3
    assert [u.ts for u in slack.updates] == [parent.ts]


async def test_judged_against_production_the_message_says_so(slack: FakeSlack, notifiers: MakeNotifier) -> None:
    notifier = await notifiers()

    notifier.notify(notice(Moment.CHECK_FAILED, value=0.3, baseline=0.02, production_value=0.1, next_step="hold"))

    [message] = await slack.wait_for_messages(1)
    assert (message.text or "").endswith("(value 0.3 vs production 0.1)")
    assert "next: hold" in str(message.blocks)
