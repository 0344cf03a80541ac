"""Every notifier type through a whole rollout on the real API server and Prometheus, as its service receives it:
a promotion and a rollback, each seen by Slack (a thread per rollout), Microsoft Teams, Discord, Google Chat,
Mattermost, Rocket.Chat, a CloudEvents webhook (signature checked) and email (a real SMTP server with STARTTLS
and AUTH), all configured in one notifiers file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.kit import Cluster, birdwatch, canary_steps, controller, eventually, mesh
from hookfakes import (
    CloudEventsReceiver,
    FakeDiscord,
    FakeGoogleChat,
    FakeMattermost,
    FakeRocketChat,
    FakeTeams,
)
from process import Fleet
from slackfake import FakeSlack
from smtpserver import SMTPServer

TOKEN = "xoxb-5555555555-6666666666-notifiersTESTtoken0123456"
TEAMS_SIG = "teamsSIGsecret0123456789abcdef"
DISCORD_TOKEN = "discordTOKENsecret-0123456789abcdefABCDEF"
CHAT_KEY, CHAT_TOKEN = "AIzaSyCHATkeySECRET012345", "chatTOKENsecret0123456789"
MATTERMOST_KEY = "mattermostKEYsecret0123456789"
ROCKET_TOKEN = "rocketTOKENsecret0123456789"
HMAC_SECRET = "webhook-hmac-secret-0123456789"
SMTP_USER, SMTP_PASSWORD = "birdwatch", "smtp-PASSWORD-secret-0123"
pytest_plugins = ("process",)
SECRETS = (
    TOKEN,
    TEAMS_SIG,
    DISCORD_TOKEN,
    CHAT_KEY,
    CHAT_TOKEN,
    MATTERMOST_KEY,
    ROCKET_TOKEN,
    HMAC_SECRET,
    SMTP_PASSWORD,
)


def metric(namespace: str) -> str:
    return f'max(bwtest_errors{{ns="{namespace}"}})'


@dataclass
class Services:
    slack: FakeSlack
    teams: FakeTeams
    discord: FakeDiscord
    chat: FakeGoogleChat
    mattermost: FakeMattermost
    rocket: FakeRocketChat
    hook: CloudEventsReceiver
    smtp: SMTPServer
    file: Path


def _secret(folder: Path, name: str, value: str) -> str:
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def notifiers_file(folder: Path, s: Services, *, moments: Any = "all") -> Path:
    """The notifiers file a user would write for these services, credentials in files of their own."""
    common: dict[str, Any] = {"moments": moments, "retries": 1, "timeout": 3}
    notifiers: list[dict[str, Any]] = [
        {
            "name": "deploys",
            "type": "slack",
            "channel": "deployment",
            "token_file": _secret(folder, "slack-token", TOKEN),
            "api_url": s.slack.base_url,
        },
        {"name": "ops-teams", "type": "teams", "url_file": _secret(folder, "teams-url", s.teams.url)},
        {"name": "discord", "type": "discord", "url_file": _secret(folder, "discord-url", s.discord.url)},
        {"name": "gchat", "type": "googlechat", "url_file": _secret(folder, "chat-url", s.chat.url)},
        {"name": "mm", "type": "mattermost", "url_file": _secret(folder, "mm-url", s.mattermost.url)},
        {"name": "rocket", "type": "rocketchat", "url_file": _secret(folder, "rc-url", s.rocket.url)},
        {
            "name": "hooks",
            "type": "webhook",
            "url": s.hook.url,
            "secret_file": _secret(folder, "hmac", HMAC_SECRET),
        },
        {
            "name": "mail",
            "type": "email",
            "host": "127.0.0.1",
            "port": s.smtp.port,
            "security": "starttls",
            "username": SMTP_USER,
            "password_file": _secret(folder, "smtp-password", SMTP_PASSWORD),
            "ca_file": str(s.smtp.ca_file),
            "from": "birdwatch@example.com",
            "to": ["releases@example.com", "oncall@example.com"],
        },
    ]
    path = folder / "notifiers.yaml"
    path.write_text(yaml.safe_dump({"notifiers": [{**n, **common} for n in notifiers]}))
    return path


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    slack = await FakeSlack(token=TOKEN, channels=["deployment"]).start()
    fakes = [
        await FakeTeams(sig=TEAMS_SIG).start(),
        await FakeDiscord(token=DISCORD_TOKEN).start(),
        await FakeGoogleChat(key=CHAT_KEY, token=CHAT_TOKEN).start(),
        await FakeMattermost(key=MATTERMOST_KEY).start(),
        await FakeRocketChat(token=ROCKET_TOKEN).start(),
        await CloudEventsReceiver(secret=HMAC_SECRET).start(),
    ]
    smtp = await SMTPServer(tmp_path / "smtp-pki", user=SMTP_USER, password=SMTP_PASSWORD).start()
    teams, discord, chat, mattermost, rocket, hook = fakes
    assert isinstance(teams, FakeTeams)
    assert isinstance(discord, FakeDiscord)
    assert isinstance(chat, FakeGoogleChat)
    assert isinstance(mattermost, FakeMattermost)
    assert isinstance(rocket, FakeRocketChat)
    assert isinstance(hook, CloudEventsReceiver)
    s = Services(slack, teams, discord, chat, mattermost, rocket, hook, smtp, tmp_path)
    try:
        yield s
    finally:
        for fake in fakes:
            await fake.close()
        await slack.close()
        await smtp.close()


async def rollout(
    *,
    services: Services,
    cluster: Cluster,
    admin: KubeHTTP,
    plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
    healthy: bool,
) -> dict[str, Any]:
    """One rollout with every notifier: promoted at 20 % when ``healthy``, else rolled back after its first step."""
    ns = cluster.namespace
    mesh(admin, ns)
    exporter.set_gauge("bwtest_errors", 0.1, ns=ns)
    await asyncio.to_thread(prometheus.wait_for_value, metric(ns), 0.1)
    path = notifiers_file(services.file, services)
    async with controller(plane, prometheus_url=prometheus.url, namespaces=[ns], extra=["--notifiers-file", str(path)]):
        spec = {"metric": metric(ns), "max_weight": 20, "interval": 2 if healthy else 3, "deviation": 0.2}
        await cluster.create_bw(birdwatch("aleph", **spec))
        if not healthy:
            await eventually(lambda: _weight(cluster, 10), what="canary at 10%")
            exporter.set_gauge("bwtest_errors", 0.9, ns=ns)
            await asyncio.to_thread(prometheus.wait_for_value, metric(ns), 0.9)
        status = await cluster.wait_phase("Promoted" if healthy else "RolledBack")
        # Every notifier has its four notices: started, the steps (or unhealthy), the ending.
        await services.slack.wait_for_messages(4)
        for fake in (services.teams, services.discord, services.chat, services.mattermost, services.rocket):
            await fake.wait_for(4)
        await services.hook.wait_for(4)
        await services.smtp.wait_for(4)
        await eventually(lambda: _updated(services.slack), what="the thread's first message updated")
    return status


async def _weight(cluster: Cluster, at_least: int) -> bool:
    return int((await cluster.status()).get("canaryWeight") or 0) >= at_least


async def _updated(slack: FakeSlack) -> bool:
    return bool(slack.updates)


@pytest.fixture
def run(
    services: Services,
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> Any:
    async def go(*, healthy: bool) -> dict[str, Any]:
        return await rollout(
            services=services,
            cluster=cluster,
            admin=admin_http,
            plane=control_plane,
            prometheus=prometheus,
            exporter=exporter,
            healthy=healthy,
        )

    return go


def _ending(healthy: bool) -> tuple[str, str, str]:
    """The last notice's moment, headline and weight."""
    return ("Promoted", "promoted", "100%") if healthy else ("RolledBack", "rolled back", "0%")


@pytest.mark.parametrize("healthy", [True, False], ids=["promotion", "rollback"])
async def test_every_type_gets_the_rollout_in_its_own_format(
    healthy: bool, run: Any, services: Services, cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await run(healthy=healthy)
    # No credential reached a log line, an Event or the status.
    logged = capsys.readouterr()
    told = json.dumps([await cluster.events(), status])
    for secret in SECRETS:
        assert secret not in logged.out
        assert secret not in logged.err
        assert secret not in told
    ns = cluster.namespace
    moment, headline, weight = _ending(healthy)
    middle = ["TrafficShifted", "TrafficShifted"] if healthy else ["TrafficShifted", "CanaryUnhealthy"]
    moments = ["RolloutStarted", *middle, moment]
    who = f"{ns}/aleph"

    # Slack: one first message, the rest replies in its thread, the first message updated with the outcome.
    slack = services.slack
    parents = [m for m in slack.messages if m.thread_ts is None]
    assert len(parents) == 1, [m.text for m in slack.messages]
    [parent] = parents
    assert (parent.text or "").startswith(f":hatching_chick: *{who}*: canary v04 of aleph at 10% — rollout started")
    replies = slack.thread(parent.ts)
    assert [r.text is not None for r in replies] == [True] * 3
    assert moment in str(replies[-1].blocks)
    [update] = slack.updates
    assert update.ts == parent.ts
    assert (update.text or "").startswith((":rocket:" if healthy else ":rewind:") + f" *{who}*: canary v04")
    assert f"— {headline}" in (update.text or "")
    bw = await cluster.bw()
    thread = json.loads(bw["metadata"]["annotations"]["threads.birdwatch.otomato.link/deploys"])
    assert thread["ts"] == parent.ts
    assert thread["rollout"] == f"{bw['metadata']['uid']}/1"

    # Teams: an Adaptive Card per notice; the ending's headline coloured Good or Attention, the facts in a FactSet.
    cards = [r.json()["attachments"][0]["content"] for r in services.teams.received]
    assert [c["body"][-1]["text"] for c in cards] == moments
    last = cards[-1]
    assert last["body"][0]["color"] == ("Good" if healthy else "Attention")
    assert f"{who}: canary v04 of aleph at {weight} — {headline}" in last["body"][0]["text"]
    facts = {f["title"]: f["value"] for f in last["body"][2]["facts"]}
    assert facts["Namespace"] == ns
    assert facts["BirdWatch"] == "aleph"
    assert facts["Service"] == "aleph"
    assert facts["Canary"] == "v04"
    assert facts["Weight"] == weight
    assert "baseline 0.1" in facts["Value"]
    assert facts["Next"]

    # Discord: one embed per notice, coloured by outcome, the facts as fields; mentions off.
    bodies = [r.json() for r in services.discord.received]
    assert all(r.query == {"wait": "true"} for r in services.discord.received)
    embed = bodies[-1]["embeds"][0]
    assert embed["color"] == (0x2EB886 if healthy else 0xD00000)
    assert headline in embed["title"]
    assert [b["embeds"][0]["footer"]["text"] for b in bodies] == moments
    assert {f["name"]: f["value"] for f in embed["fields"]}["Weight"] == weight
    assert bodies[-1]["allowed_mentions"] == {"parse": []}

    # Google Chat: a card per notice, all in one thread keyed by the rollout.
    chats = services.chat.received
    assert {r.query["threadKey"] for r in chats} == {f"birdwatch-{bw['metadata']['uid']}/1"}
    assert len(services.chat.threads) == 1
    card = chats[-1].json()["cardsV2"][0]["card"]
    assert card["header"]["subtitle"] == moment
    assert headline in card["header"]["title"]
    labels = {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"] for w in card["sections"][0]["widgets"][1:]}
    assert labels["Canary"] == "v04"

    # Mattermost and Rocket.Chat: an attachment coloured by outcome, the facts as short fields.
    for fake in (services.mattermost, services.rocket):
        attachment = fake.received[-1].json()["attachments"][0]
        assert attachment["color"] == ("#2EB886" if healthy else "#D00000")
        assert headline in attachment["title"]
        assert {f["title"]: f["value"] for f in attachment["fields"]}["Namespace"] == ns
    assert services.mattermost.received[-1].json()["username"] == "birdwatch"
    assert services.rocket.received[-1].json()["alias"] == "birdwatch"

    # The webhook: structured CloudEvents, signed (the receiver refused nothing), one type per moment.
    assert services.hook.refused == []
    events = services.hook.events
    ending = "promoted" if healthy else "rolled_back"
    middle_types = ["step", "step"] if healthy else ["step", "unhealthy"]
    assert [e.get_type() for e in events] == [
        f"link.otomato.birdwatch.rollout.{t}" for t in ["started", *middle_types, ending]
    ]
    assert events[-1].get_source() == f"/apis/otomato.link/v1alpha1/namespaces/{ns}/birdwatches/aleph"
    assert events[-1].get_subject() == "aleph"
    assert len({e.get_id() for e in events}) == 4
    data = events[-1].get_data()
    assert isinstance(data, dict)
    assert data["moment"] == moment
    assert data["uid"] == bw["metadata"]["uid"]
    assert (data["namespace"], data["birdwatch"], data["service"], data["canaryVersion"]) == (
        ns,
        "aleph",
        "aleph",
        "v04",
    )
    assert data["weight"] == status["canaryWeight"]
    assert data["baseline"] == pytest.approx(0.1)
    assert data["next"]

    # Email: over STARTTLS, logged in, to both recipients; subject and body say what happened.
    mails = services.smtp.messages
    assert all(m.tls and m.user == SMTP_USER for m in mails)
    assert mails[-1].recipients == ["releases@example.com", "oncall@example.com"]
    last_mail = mails[-1].message
    assert f"{who}: canary v04 of aleph at {weight} — {headline}" in str(last_mail["Subject"])
    assert last_mail["X-Birdwatch-Moment"] == moment
    body = last_mail.get_body(preferencelist=("plain",))
    assert body is not None
    text = body.get_content()
    for line in (f"Namespace: {ns}", "BirdWatch: aleph", "Service: aleph", "Canary: v04", f"Weight: {weight}"):
        assert line in text, text
    assert "baseline 0.1" in text
    html = last_mail.get_body(preferencelist=("html",))
    assert html is not None
    assert ("#2EB886" if healthy else "#D00000") in html.get_content()


# --- one bad endpoint --------------------------------------------------------------------------------------------


async def test_a_notifier_answering_500_or_hanging_delays_neither_the_rollout_nor_the_others(
    services: Services,
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> None:
    ns = cluster.namespace
    mesh(admin_http, ns)
    exporter.set_gauge("bwtest_errors", 0.1, ns=ns)
    await asyncio.to_thread(prometheus.wait_for_value, metric(ns), 0.1)
    services.teams.fail_next(10_000, status=500)  # Teams answers 500, always
    services.hook.hang(60)  # the webhook's service never answers
    loop = asyncio.get_running_loop()
    folder = services.file
    common: dict[str, Any] = {"moments": "all", "retries": 5, "timeout": 30}
    path = folder / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "notifiers": [
                    {
                        "name": "failing",
                        "type": "teams",
                        "url_file": _secret(folder, "t", services.teams.url),
                        **common,
                    },
                    {"name": "hanging", "type": "webhook", "url": services.hook.url, **common},
                    {
                        "name": "good",
                        "type": "discord",
                        "url_file": _secret(folder, "d", services.discord.url),
                        **common,
                    },
                ]
            }
        )
    )
    async with (
        controller(
            control_plane, prometheus_url=prometheus.url, namespaces=[ns], extra=["--notifiers-file", str(path)]
        ) as app,
        cluster.recording() as history,
    ):
        started = loop.time()
        await cluster.create_bw(birdwatch("aleph", metric=metric(ns), interval=1, max_weight=40))
        await cluster.wait_phase("Promoted", timeout=30)
        took = loop.time() - started
        # Every notice reached the good notifier while the others were failing and hanging.
        received = await services.discord.wait_for(6, timeout=3)
        counts = {
            (n, r): app.metrics.registry.get_sample_value("birdwatch_notifications_total", {"notifier": n, "result": r})
            for n in ("failing", "hanging", "good")
            for r in ("sent", "retried", "failed")
        }
    assert canary_steps(history, "canary") == [0, 10, 20, 30, 40, 0]
    # Four intervals of 1 s and the promotion; what an idle machine takes plus room for a shared one, not 30 s
    # timeouts or five retries.
    assert took < 12, f"the rollout took {took:.1f}s"
    assert [r.json()["embeds"][0]["footer"]["text"] for r in received] == [
        "RolloutStarted",
        "TrafficShifted",
        "TrafficShifted",
        "TrafficShifted",
        "TrafficShifted",
        "Promoted",
    ]
    assert counts[("good", "sent")] == 6
    assert (counts[("failing", "retried")] or 0) >= 1
    assert not counts[("failing", "sent")]
    assert services.hook.requests == 1, "the hanging webhook got more than its first request"
    assert not counts[("hanging", "sent")]


# --- a Slack thread across a SIGKILL -------------------------------------------------------------------------------


async def test_a_slack_thread_survives_sigkill_and_restart_mid_rollout(
    fleet: Fleet,
    services: Services,
    cluster: Cluster,
    admin_http: KubeHTTP,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> None:
    ns = cluster.namespace
    mesh(admin_http, ns)
    exporter.set_gauge("bwtest_errors", 0.1, ns=ns)
    await asyncio.to_thread(prometheus.wait_for_value, metric(ns), 0.1)
    folder = services.file
    path = folder / "slack.yaml"
    token_file = _secret(folder, "slack-token", TOKEN)
    path.write_text(
        yaml.safe_dump(
            {
                "notifiers": [
                    {
                        "name": "deploys",
                        "type": "slack",
                        "channel": "deployment",
                        "token_file": token_file,
                        "api_url": services.slack.base_url,
                        "moments": "all",
                    }
                ]
            }
        )
    )
    env = {"BIRDWATCH_NOTIFIERS_FILE": str(path), "HTTPS_PROXY": "", "HTTP_PROXY": ""}
    first = fleet.start("first", namespace=ns, env=env, health=False)
    await first.wait_for("listed birdwatches")
    await cluster.create_bw(birdwatch("aleph", metric=metric(ns), interval=2, max_weight=50))

    async def threaded_at(weight: int) -> bool:
        bw = await cluster.bw()
        remembered = "threads.birdwatch.otomato.link/deploys" in (bw["metadata"].get("annotations") or {})
        return remembered and int((bw.get("status") or {}).get("canaryWeight") or 0) >= weight

    await eventually(lambda: threaded_at(20), timeout=30, what="a remembered thread and the canary at 20%")
    first.kill()
    await first.wait(10)
    posted_before = len(services.slack.messages)

    second = fleet.start("second", namespace=ns, env=env, health=False)
    await cluster.wait_phase("Promoted", timeout=40)
    await eventually(lambda: _updated(services.slack), timeout=10, what="the first message updated")
    second.terminate()
    assert await second.wait(15) == 0, second.tail()

    messages = services.slack.messages
    parents = [m for m in messages if m.thread_ts is None]
    assert len(parents) == 1, [(m.text, m.thread_ts) for m in messages]
    [parent] = parents
    assert "rollout started" in (parent.text or "")
    replies = services.slack.thread(parent.ts)
    assert len(replies) == len(messages) - 1
    assert len(messages) > posted_before, "the second process posted nothing"
    assert "promoted" in (replies[-1].text or "")
    [update] = services.slack.updates
    assert update.ts == parent.ts
    assert (update.text or "").startswith(":rocket:")
    assert "promoted" in (update.text or "")
    assert TOKEN not in first.text() + second.text()


# --- spec.notify ---------------------------------------------------------------------------------------------------


async def test_spec_notify_picks_notifiers_by_name_and_namespaces_still_filter(
    services: Services,
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> None:
    ns = cluster.namespace
    mesh(admin_http, ns)
    exporter.set_gauge("bwtest_errors", 0.1, ns=ns)
    await asyncio.to_thread(prometheus.wait_for_value, metric(ns), 0.1)
    folder = services.file
    discord = _secret(folder, "d", services.discord.url)
    mm = _secret(folder, "m", services.mattermost.url)
    hmac = _secret(folder, "hmac", HMAC_SECRET)
    path = folder / "picked.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "notifiers": [
                    {"name": "hooks", "type": "webhook", "url": services.hook.url, "secret_file": hmac},
                    {"name": "discord", "type": "discord", "url_file": discord},
                    {"name": "elsewhere", "type": "mattermost", "url_file": mm, "namespaces": ["other-team"]},
                ]
            }
        )
    )
    async with controller(
        control_plane, prometheus_url=prometheus.url, namespaces=[ns], extra=["--notifiers-file", str(path)]
    ):
        spec = {"metric": metric(ns), "max_weight": 10, "notify": ["hooks", "elsewhere", "nobody"]}
        await cluster.create_bw(birdwatch("aleph", **spec))
        await cluster.wait_phase("Promoted")
        await services.hook.wait_for(2)  # default moments: started, promoted
        await asyncio.sleep(0.5)
    assert [e.get_type().rsplit(".", 1)[1] for e in services.hook.events] == ["started", "promoted"]
    assert services.discord.requests == 0, "not named in spec.notify"
    assert services.mattermost.requests == 0, "named, but its namespace filter does not match"
    assert (await cluster.bw())["spec"]["notify"] == ["hooks", "elsewhere", "nobody"]
