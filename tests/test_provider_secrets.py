"""No provider's credentials reach logs, Events, status or notifications, whatever the backend echoes back.

Every provider type is configured with known secrets (read from files, as from a mounted Secret) and pointed at a
server that echoes every request's headers, query and decoded basic-auth credentials: in a 400 answer to each
query (so the backend's "own words", which birdwatch puts in status, Events and logs, carry them) and in a 502 page
to each readiness probe, where the secrets start near the end of birdwatch's 200-character excerpt (a cut secret
must not leak its first half). Then everything a person could read is searched for them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from aiohttp import web

from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.kit import Cluster, birdwatch, controller, eventually
from providerkit import (
    DD_API_KEY,
    DD_APP_KEY,
    INFLUX_PASSWORD,
    NR_ACCOUNT,
    NR_API_KEY,
    VM_TOKEN,
    WEB_API_KEY,
    providers_file,
    secret_file,
)
from slackfake import FakeSlack
from test_bad_input import JsonLog, everything_said, json_log, service
from wireserver import WireServer

__all__ = ["json_log"]  # a fixture, found by pytest here

GRAPHITE_PASSWORD = "graphite-SECRET-7777"
LOKI_TOKEN = "loki-SECRET-8888"
SLACK_TOKEN = "xoxb-SECRET-9999"
INFLUX_BASIC = base64.b64encode(f"birdwatch:{INFLUX_PASSWORD}".encode()).decode()
GRAPHITE_BASIC = base64.b64encode(f"birdwatch:{GRAPHITE_PASSWORD}".encode()).decode()
SECRETS = {
    "the Datadog API key": DD_API_KEY,
    "the Datadog application key": DD_APP_KEY,
    "the New Relic API key": NR_API_KEY,
    "the web provider's API key": WEB_API_KEY,
    "the InfluxDB password": INFLUX_PASSWORD,
    "the VictoriaMetrics token": VM_TOKEN,
    "the Graphite password": GRAPHITE_PASSWORD,
    "the Loki token": LOKI_TOKEN,
    "the Slack token": SLACK_TOKEN,
    "the InfluxDB basic-auth credentials": INFLUX_BASIC,
    "the Graphite basic-auth credentials": GRAPHITE_BASIC,
}


def leaks(text: str) -> list[str]:
    found = [name for name, secret in SECRETS.items() if secret in text]
    # Every secret here has SECRET in it: its readable half is a leak too.
    if "SECRET" in text:
        found.append("SECRET (part of a secret)")
    return found


class EchoServer(WireServer):
    """Answers ``/<provider>/...``: 502 with an HTML page for readiness paths, 400 for everything else, each echoing
    what was sent. Remembers every header value it was sent."""

    READY = ("/-/ready", "/ping", "/ready", "/api/v1/validate")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._echo)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.text()
        # The secret-bearing headers first, so that a cut excerpt ends inside one of them.
        headers = sorted(request.headers.items(), key=lambda h: h[0].lower() not in SECRET_HEADERS)
        said = []
        for header, value in headers:
            self.seen.add(value)
            said.append(f"{header}: {value}")
            if value.startswith("Basic "):
                decoded = base64.b64decode(value[6:]).decode(errors="replace")
                self.seen.add(decoded)
                said.append(f"(that is {decoded})")
        echo = f"{' '.join(said)} query={request.query_string} body={body}"
        if request.path.endswith(self.READY) or "user { id }" in body:
            # birdwatch quotes 200 characters of a page: pad it so that the cut falls 8 characters into the first
            # secret (a cut secret is no longer the secret, but its first half still gives it away).
            head = "<html><body><h1>502 Bad Gateway</h1><p>"
            first = said[0].split(": ", 1)[0] + ": " + ("Bearer " if " " in said[0].split(": ", 1)[1] else "")
            page = f"{head}{'.' * (200 - len(head) - len(first) - 8)}{echo}</p></body></html>"
            return web.Response(status=502, text=page, content_type="text/html")
        return web.Response(status=400, text=f"bad request, you sent {echo}")


SECRET_HEADERS = ("authorization", "dd-api-key", "dd-application-key", "api-key", "x-api-key")


def entries(echo: EchoServer, secrets: Path) -> dict[str, dict[str, object]]:
    at = echo.url
    return {
        "vm": {"type": "prometheus", "address": f"{at}/vm", "token_file": secret_file(secrets, "vm", VM_TOKEN)},
        "influx": {
            "type": "influxdb",
            "address": f"{at}/influx",
            "database": "bw",
            "username": "birdwatch",
            "password_file": secret_file(secrets, "influx", INFLUX_PASSWORD),
        },
        "graphite": {
            "type": "graphite",
            "address": f"{at}/graphite",
            "username": "birdwatch",
            "password_file": secret_file(secrets, "graphite", GRAPHITE_PASSWORD),
        },
        "loki": {"type": "loki", "address": f"{at}/loki", "token_file": secret_file(secrets, "loki", LOKI_TOKEN)},
        "datadog": {
            "type": "datadog",
            "address": f"{at}/datadog",
            "api_key_file": secret_file(secrets, "dd-api", DD_API_KEY),
            "application_key_file": secret_file(secrets, "dd-app", DD_APP_KEY),
        },
        "newrelic": {
            "type": "newrelic",
            "address": f"{at}/newrelic/graphql",
            "account_id": NR_ACCOUNT,
            "api_key_file": secret_file(secrets, "nr", NR_API_KEY),
        },
        "web": {
            "type": "web",
            "address": f"{at}/web/stats",
            "header_files": {"X-Api-Key": secret_file(secrets, "web", WEB_API_KEY)},
        },
    }


async def test_no_provider_secret_reaches_logs_events_status_or_slack(
    cluster: Cluster,
    admin_http: KubeHTTP,
    control_plane: ControlPlane,
    json_log: JsonLog,
    caplog: object,
    tmp_path: Path,
    unused_tcp_port: int,
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    async with EchoServer() as echo, FakeSlack(token=SLACK_TOKEN) as slack:
        assert isinstance(echo, EchoServer)
        providers = entries(echo, secrets)
        file = providers_file(tmp_path, providers)
        for name in providers:
            service(admin_http, cluster.namespace, f"svc-{name}", "v03", "v04")
        env = {"SLACK_API_TOKEN": SLACK_TOKEN, "SLACK_API_URL": slack.base_url}
        async with controller(
            control_plane,
            prometheus_url=f"http://127.0.0.1:{unused_tcp_port}",
            namespaces=[cluster.namespace],
            extra=["--providers-file", str(file)],
            env=env,
        ):
            for name in providers:
                metric = "$.errors" if name == "web" else "errors{ns='x'}"
                await cluster.create_bw(
                    birdwatch(f"bw-{name}", service=f"svc-{name}", provider=name, metric=metric, ready_timeout=5)
                )
            statuses = {name: await cluster.wait_phase("Failed", f"bw-{name}") for name in providers}

            async def every_provider_probed() -> bool:
                logged = [e for e in json_log.lines() if e.get("event", "").endswith("not reachable; canaries using "
                          "it count failed checks until it is")]  # fmt: skip
                return len(logged) >= len(providers)

            await eventually(every_provider_probed, timeout=20, what="a readiness line per provider")
        said = await everything_said(cluster, json_log, caplog)  # type: ignore[arg-type]
        said["Slack messages"] = json.dumps([[m.text, m.blocks] for m in slack.messages], ensure_ascii=False)

    # The secrets were sent, and echoed back: the test tested something.
    sent = " ".join(echo.seen)
    assert [name for name, secret in SECRETS.items() if secret not in sent and "Slack" not in name] == []
    for name, status in statuses.items():
        assert status["reason"] == "BadQuery", (name, status)
        assert "***" in status["message"], (name, status["message"])  # the echo was there, and scrubbed
    found = {where: leaks(text) for where, text in said.items()}
    assert found == {where: [] for where in said}, found
