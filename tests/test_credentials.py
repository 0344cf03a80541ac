"""Credentials that expire, on the real API server: bearer tokens checked by a webhook token authenticator the
tests control (``envtest/tokenauth.py``), an exec plugin that mints tokens valid for seconds, a token file that
rotates, a 401 answered by one refresh and one retry, kubectl's $KUBECONFIG lists, and what birdwatch says when
there are no credentials to be had."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from birdwatch.errors import ConfigError
from birdwatch.kube import (
    VIRTUALSERVICES,
    Forbidden,
    Kube,
    KubeError,
    Resource,
    Unauthorized,
    proxy_from_environment,
)
from birdwatch_sandbox.envtest.controlplane import ControlPlane, KubeHTTP
from birdwatch_sandbox.envtest.exporter import Exporter
from birdwatch_sandbox.envtest.promserver import PrometheusServer
from birdwatch_sandbox.envtest.tokenauth import TokenServer
from birdwatch_sandbox.kit import Cluster, birdwatch, canary_steps, controller, mesh
from process import run_cli

# Mints a token, registers it with the token server as valid for "valid" seconds (read from a file the test may
# rewrite; 0 registers it already expired), notes it in the counter file and prints the ExecCredential with the
# expiry it "reported" (the same unless the test makes it lie, to get a credential the API server refuses).
PLUGIN = """\
import datetime, json, ssl, sys, time, urllib.request, uuid

server, ca, lifetime_file, counter = sys.argv[1:5]
lifetime = json.load(open(lifetime_file))
token = "exec-" + uuid.uuid4().hex
now = time.time()
until = now + lifetime["valid"]
request = urllib.request.Request(
    server + "/tokens",
    data=json.dumps({"token": token, "until": until, "user": "exec-user"}).encode(),
    headers={"Content-Type": "application/json"},
    method="POST",
)
urllib.request.urlopen(request, context=ssl.create_default_context(cafile=ca), timeout=10).read()
with open(counter, "a") as f:
    f.write(token + "\\n")
expiry = datetime.datetime.fromtimestamp(now + lifetime["reported"], datetime.timezone.utc)
print(json.dumps({
    "apiVersion": "client.authentication.k8s.io/v1",
    "kind": "ExecCredential",
    "status": {"token": token, "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
}))
"""


FINE = ["--prometheus-url", "http://127.0.0.1:9", "--health-address", "off"]  # past every check but credentials


class ExecPlugin:
    """A kubeconfig whose user is the plugin above, and what the plugin has done."""

    def __init__(self, folder: Path, plane: ControlPlane, tokens: TokenServer, *, lifetime: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.script = folder / "plugin.py"
        self.script.write_text(PLUGIN)
        self.lifetime_file = folder / "lifetime"
        self.counter = folder / "minted"
        self.counter.touch()
        self.set_lifetime(lifetime)
        self.kubeconfig = write_config(
            folder / "exec.kubeconfig",
            plane,
            user={
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": sys.executable,
                    "args": [str(self.script), tokens.url, str(tokens.ca), str(self.lifetime_file), str(self.counter)],
                    "interactiveMode": "Never",
                }
            },
        )

    def set_lifetime(self, valid: float, *, reported: float | None = None) -> None:
        """Tokens minted from now on: how long the API server takes them, and how long the plugin says."""
        self.lifetime_file.write_text(json.dumps({"valid": valid, "reported": valid if reported is None else reported}))

    def minted(self) -> list[str]:
        return self.counter.read_text().split()


def write_config(path: Path, plane: ControlPlane, *, user: dict[str, Any], server: str | None = None) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "envtest", "cluster": {"server": server or plane.url, "certificate-authority": str(plane.ca)}}
        ],
        "users": [{"name": "tester", "user": user}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "tester"}}],
        "current-context": "envtest",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def tokens(control_plane: ControlPlane) -> TokenServer:
    assert control_plane.tokens is not None, "the session's control plane runs the token webhook"
    return control_plane.tokens


def refused(tokens: TokenServer, token: str) -> int:
    return sum(1 for t, ok in tokens.reviews() if t == token and not ok)


# --- an exec plugin through a whole rollout -----------------------------------------------------------------------


async def test_a_rollout_outlives_many_short_lived_exec_credentials(
    tmp_path: Path,
    control_plane: ControlPlane,
    tokens: TokenServer,
    admin_http: KubeHTTP,
    cluster: Cluster,
    prometheus: PrometheusServer,
    exporter: Exporter,
) -> None:
    plugin = ExecPlugin(tmp_path, control_plane, tokens, lifetime=3.0)
    ns = cluster.namespace
    mesh(admin_http, ns)
    exporter.set_gauge("bwtest_errors", 0.0, ns=ns)
    metric = f'max(bwtest_errors{{ns="{ns}"}})'
    prometheus.wait_for_value(metric, 0.0)
    async with (
        controller(
            control_plane,
            prometheus_url=prometheus.url,
            namespaces=[ns],
            extra=["--kubeconfig", str(plugin.kubeconfig)],  # the last --kubeconfig wins
        ) as app,
        cluster.recording() as history,
    ):
        await cluster.create_bw(birdwatch("aleph", metric=metric, increment=10, interval=2))
        status = await cluster.wait_phase("Promoted", timeout=60)
        assert app.kube is not None
        credentials = app.kube.credentials
    # Read once the controller has stopped, so no refresh starts after: one may have been cut short by the stop,
    # counted but with its token not (or not yet) minted.
    refreshes = credentials.refreshes
    minted = plugin.minted()
    assert canary_steps(history, "canary") == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 0]
    assert await cluster.weights() == {"production": 100, "canary": 0}
    assert status["canaryWeight"] == 100
    # One token at start, then one about every 2.4 s (at four fifths of its life) through a rollout of 20 s.
    # (The API server keeps a successful authentication 10 s: a client that never refreshed would be refused
    # half-way.)
    assert len(minted) >= 6, minted
    assert refreshes in (len(minted) - 1, len(minted)), (refreshes, minted)
    # Every token was used, and refreshed before it ended: the API server never refused one of them.
    reviewed = {t for t, ok in tokens.reviews() if ok}
    assert set(minted[:-1]) <= reviewed
    assert [t for t in minted if refused(tokens, t)] == []


# --- a 401: one refresh, one retry ----------------------------------------------------------------------------------
#
# kube-apiserver keeps every successful authentication for 10 s whatever the webhook's TTL (a built-in cache with no
# flag), so revoking a token that has worked takes that long. These tests use a token the API server has never
# accepted instead: the plugin registers it already expired but says it is good for an hour, so birdwatch has no
# reason to refresh it until the 401.


async def refused_then_valid(plugin: ExecPlugin) -> Kube:
    """A client whose first credential is refused, and whose next ones are good for an hour."""
    plugin.set_lifetime(0, reported=3600)
    kube = await Kube.connect(kubeconfig=str(plugin.kubeconfig))
    plugin.set_lifetime(3600)
    return kube


async def test_a_401_refreshes_once_for_all_concurrent_requests_and_retries_them(
    tmp_path: Path, control_plane: ControlPlane, tokens: TokenServer, namespace: str, admin_http: KubeHTTP
) -> None:
    mesh(admin_http, namespace)
    plugin = ExecPlugin(tmp_path, control_plane, tokens, lifetime=3600)
    kube = await refused_then_valid(plugin)
    try:
        # Fifty requests meet the 401 at about the same time: one plugin call, and every one of them retried.
        results = await asyncio.gather(*(kube.get(VIRTUALSERVICES, namespace, "aleph") for _ in range(50)))
        assert all(vs["metadata"]["name"] == "aleph" for vs in results)
        first, second = plugin.minted()
        assert kube.credentials.refreshes == 1
        assert refused(tokens, first) >= 1
        assert refused(tokens, second) == 0
    finally:
        await kube.close()

    # A write is retried too: the API server refused it before doing anything with it.
    kube = await refused_then_valid(plugin)
    try:
        patched = await kube.merge_patch(VIRTUALSERVICES, namespace, "aleph", {"metadata": {"labels": {"x": "y"}}})
        assert patched["metadata"]["labels"]["x"] == "y"
        assert len(plugin.minted()) == 4
        assert kube.credentials.refreshes == 1
    finally:
        await kube.close()


async def test_a_credential_refused_after_its_refresh_raises_unauthorized_after_one_retry(
    tmp_path: Path, control_plane: ControlPlane, tokens: TokenServer, namespace: str, admin_http: KubeHTTP
) -> None:
    mesh(admin_http, namespace)
    plugin = ExecPlugin(tmp_path, control_plane, tokens, lifetime=3600)
    plugin.set_lifetime(0, reported=3600)  # every token refused
    kube = await Kube.connect(kubeconfig=str(plugin.kubeconfig))
    try:
        with pytest.raises(Unauthorized) as caught:
            await kube.get(VIRTUALSERVICES, namespace, "aleph")
        assert len(plugin.minted()) == 2  # one refresh, one retry, then the error: no loop
        error = caught.value
        assert (error.status, error.method) == (401, "GET")
        assert error.path == f"/apis/networking.istio.io/v1/namespaces/{namespace}/virtualservices/aleph"
        assert error.describe().startswith(f'GET virtualservices "aleph" in namespace {namespace}: 401 Unauthorized')
        assert not error.retryable
        # Refused again at once: the credential was refreshed under a second ago, so not again for this request.
        with pytest.raises(Unauthorized):
            await kube.get(VIRTUALSERVICES, namespace, "aleph")
        assert len(plugin.minted()) == 2
    finally:
        await kube.close()


async def test_a_watch_refused_with_401_is_retried_with_a_fresh_credential(
    tmp_path: Path, control_plane: ControlPlane, tokens: TokenServer, namespace: str, admin_http: KubeHTTP
) -> None:
    mesh(admin_http, namespace)
    plugin = ExecPlugin(tmp_path, control_plane, tokens, lifetime=3600)
    kube = await refused_then_valid(plugin)
    try:
        events = [e async for e in kube.watch(VIRTUALSERVICES, namespace, resource_version="0", timeout_seconds=1)]
        assert [(e.type, e.object["metadata"]["name"]) for e in events if e.type != "BOOKMARK"] == [("ADDED", "aleph")]
        assert len(plugin.minted()) == 2
    finally:
        await kube.close()


async def test_a_token_file_is_read_again_when_it_changes(
    tmp_path: Path, control_plane: ControlPlane, tokens: TokenServer, namespace: str, admin_http: KubeHTTP
) -> None:
    mesh(admin_http, namespace)
    token_file = tmp_path / "token"
    token_file.write_text("file-token-1")
    tokens.allow("file-token-1", until=float("inf"))
    # A relative tokenFile is relative to the kubeconfig that names it, as kubectl reads it.
    kubeconfig = write_config(tmp_path / "config", control_plane, user={"tokenFile": "token"})
    kube = await Kube.connect(kubeconfig=str(kubeconfig))
    try:
        await kube.get(VIRTUALSERVICES, namespace, "aleph")
        # Rotated, as the kubelet rotates a projected service-account token.
        token_file.write_text("file-token-2")
        tokens.allow("file-token-2", until=float("inf"))
        await asyncio.sleep(1.1)  # the file is looked at (one stat) at most once a second
        await kube.get(VIRTUALSERVICES, namespace, "aleph")
        assert ("file-token-2", True) in tokens.reviews()
        assert kube.credentials.refreshes == 1
    finally:
        await kube.close()


SELF_SUBJECT_REVIEWS = Resource("authentication.k8s.io", "v1", "selfsubjectreviews", "SelfSubjectReview", False)


async def test_in_cluster_credentials_are_read_again_after_a_401(
    tmp_path: Path, control_plane: ControlPlane, namespace: str, admin_http: KubeHTTP
) -> None:
    """A pod's service-account files, with the token rotated (as the kubelet does) after birdwatch read it: the
    401 makes it read the file again at once (kubernetes_asyncio's own hook would in a minute)."""
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "ca.crt").write_bytes(control_plane.ca.read_bytes())
    (folder / "token").write_text("a-token-the-api-server-never-issued")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(control_plane.api_port)}
    kube = await Kube.connect(kubeconfig=None, env=env, service_account=folder)
    try:
        assert kube.host == control_plane.url
        admin_http.apply(
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bw", "namespace": namespace}}
        )
        status, body = admin_http.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/bw/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}},
        )
        assert status == 201, body
        (folder / "token").write_text(body["status"]["token"])
        review = await kube.create(
            SELF_SUBJECT_REVIEWS, None, {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        )
        assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:bw"
        assert kube.credentials.refreshes == 1
    finally:
        await kube.close()


async def test_an_rbac_refusal_says_what_was_refused(
    tmp_path: Path, control_plane: ControlPlane, tokens: TokenServer, namespace: str, admin_http: KubeHTTP
) -> None:
    """A user the webhook vouches for but no Role names: 403, said with the verb, kind, name and namespace."""
    mesh(admin_http, namespace)
    tokens.allow("nobody-token", until=float("inf"), user="nobody", groups=())
    kubeconfig = write_config(tmp_path / "config", control_plane, user={"token": "nobody-token"})
    kube = await Kube.connect(kubeconfig=str(kubeconfig))
    try:
        with pytest.raises(Forbidden) as caught:
            await kube.merge_patch(VIRTUALSERVICES, namespace, "aleph", {"metadata": {"labels": {"x": "y"}}})
    finally:
        await kube.close()
    error = caught.value
    assert (error.status, error.method, error.reason) == (403, "PATCH", "Forbidden")
    assert error.describe().startswith(f'PATCH virtualservices "aleph" in namespace {namespace}: 403 Forbidden: ')
    assert 'User "nobody" cannot patch resource "virtualservices"' in error.describe()  # the API server's words
    assert "\n" not in error.describe()
    assert str(error).startswith("403 Forbidden: ")  # what logs and older callers read stays as it was


def test_errors_built_elsewhere_keep_their_old_form() -> None:
    error = KubeError(0, "Unreachable", "GET /x: ClientConnectorError: refused")
    assert (error.method, error.path, str(error)) == ("", "", "GET /x: ClientConnectorError: refused")
    assert error.retryable
    assert KubeError(503, "ServiceUnavailable", "busy").describe() == "503 ServiceUnavailable: busy"
    watch = KubeError(0, "WatchBroken", "TimeoutError: ", method="GET", path="/apis/otomato.link/v1alpha1/birdwatches")
    assert watch.describe() == "GET birdwatches: WatchBroken: TimeoutError:"
    status = KubeError(
        409, "Conflict", "changed", method="PATCH", path="/apis/otomato.link/v1alpha1/namespaces/a/birdwatches/b/status"
    )
    assert status.describe() == 'PATCH birdwatches/status "b" in namespace a: 409 Conflict: changed'
    assert KubeError(404, "NotFound", "x", method="GET", path="/api/v1/namespaces/shop").describe() == (
        'GET namespaces "shop": 404 NotFound: x'
    )


# --- $KUBECONFIG, as kubectl reads it ----------------------------------------------------------------------------


async def test_kubeconfig_lists_merge_with_the_first_file_winning(
    tmp_path: Path, control_plane: ControlPlane, namespace: str, admin_http: KubeHTTP
) -> None:
    mesh(admin_http, namespace)
    admin = {"client-certificate": str(control_plane.admin.cert), "client-key": str(control_plane.admin.key)}
    first = tmp_path / "first"
    first.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "envtest",
                        "cluster": {"server": control_plane.url, "certificate-authority": str(control_plane.ca)},
                    }
                ],
                "contexts": [{"name": "main", "context": {"cluster": "envtest", "user": "admin"}}],
                "current-context": "main",
            }
        )
    )
    second = tmp_path / "second"
    second.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                # Both lose to the first file: its cluster of the same name, and its current-context.
                "clusters": [{"name": "envtest", "cluster": {"server": "https://127.0.0.1:9"}}],
                "contexts": [{"name": "elsewhere", "context": {"cluster": "envtest", "user": "admin"}}],
                "current-context": "elsewhere",
                "users": [{"name": "admin", "user": admin}],  # only here: merged in
            }
        )
    )
    empty = tmp_path / "empty"
    empty.write_text("")
    listed = os.pathsep.join([str(first), str(tmp_path / "missing"), str(empty), str(second)])
    kube = await Kube.connect(kubeconfig=None, env={"KUBECONFIG": listed, "HOME": str(tmp_path)})
    try:
        assert kube.host == control_plane.url
        vs = await kube.get(VIRTUALSERVICES, namespace, "aleph")
        assert vs["metadata"]["name"] == "aleph"
    finally:
        await kube.close()


def test_the_cli_reads_a_kubeconfig_list(tmp_path: Path, control_plane: ControlPlane) -> None:
    """The real process with KUBECONFIG=a:b gets past loading credentials (it fails later, on purpose: an
    unknown context given with --context names it, so the line proves which files were read)."""
    users = tmp_path / "users"
    users.write_text(
        yaml.safe_dump({"users": [{"name": "admin", "user": {"client-certificate": str(control_plane.admin.cert)}}]})
    )
    clusters = write_config(tmp_path / "clusters", control_plane, user={})
    env = {"KUBECONFIG": f"{clusters}{os.pathsep}{users}"}
    done = run_cli(
        ["run", "--context", "nope", "--prometheus-url", "http://127.0.0.1:9", "--health-address", "off"], env=env
    )
    line = one_error_line(done)
    assert "$KUBECONFIG" in line, done
    assert str(clusters) in line, done
    assert "nope" in line, done
    assert "--kubeconfig" not in line, done


def one_error_line(done: Any) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.code == 2, done
    assert "Traceback" not in done.stderr + done.stdout, done
    assert len(lines) == 1, done
    return str(lines[0])


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("no-file-of-the-list-exists", "$KUBECONFIG"),
        ("a-garbage-file-in-the-list", "$KUBECONFIG"),
        ("no-kubeconfig-at-all", ".kube/config does not exist"),
        ("an-empty-home-kubeconfig", ".kube/config is empty"),
    ],
)
def test_kubeconfig_errors_name_where_the_credentials_were_looked_for(case: str, says: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    garbage = tmp_path / "garbage"
    garbage.write_text("clusters: [\n")
    env = {"HOME": str(home)}
    if case == "no-file-of-the-list-exists":
        env["KUBECONFIG"] = f"{tmp_path}/a{os.pathsep}{tmp_path}/b"
    elif case == "a-garbage-file-in-the-list":
        env["KUBECONFIG"] = f"{tmp_path}/a{os.pathsep}{garbage}"
    elif case == "an-empty-home-kubeconfig":
        (home / ".kube" / "config").write_text("")
    done = run_cli(["run", *FINE], env=env)
    line = one_error_line(done)
    assert says in line, done
    assert "--kubeconfig" not in line.split(";")[0], done
    assert "Expected key current-context" not in line, done


async def test_connect_reports_a_missing_home_kubeconfig_as_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        await Kube.connect(kubeconfig=None, env={"HOME": str(tmp_path)})
    message = str(caught.value)
    assert f"{tmp_path}/.kube/config does not exist" in message
    assert "not in a cluster" in message
    assert "\n" not in message


# --- proxies, resolved once as kubectl resolves them ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "env", "proxy"),
    [
        ("https://api.example.com:6443", {"HTTPS_PROXY": "proxy:3128"}, "http://proxy:3128"),
        ("https://api.example.com:6443", {"https_proxy": "http://p:1"}, "http://p:1"),
        ("https://api.example.com:6443", {"HTTP_PROXY": "http://p:1"}, None),  # http's proxy is not https's
        ("http://api.example.com", {"HTTP_PROXY": "http://p:1"}, "http://p:1"),
        ("https://127.0.0.1:6443", {"HTTPS_PROXY": "http://p:1"}, None),  # loopback: never
        ("https://localhost:6443", {"HTTPS_PROXY": "http://p:1"}, None),
        ("https://api.example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"}, None),
        ("https://example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"}, None),
        ("https://example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, "http://p:1"),
        ("https://a.example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, None),
        ("https://notexample.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"}, "http://p:1"),
        ("https://10.1.2.3:6443", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, None),
        ("https://10.1.2.3:6443", {"HTTPS_PROXY": "http://p:1", "no_proxy": "10.1.2.3"}, None),
        ("https://10.1.2.3:6443", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.1.2.3:443"}, "http://p:1"),
        ("https://api.example.com:6443", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.example.com:6443"}, None),
        ("https://api.example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": " other , *"}, None),
    ],
)
def test_proxy_from_the_environment_follows_kubectls_rules(url: str, env: dict[str, str], proxy: str | None) -> None:
    assert proxy_from_environment(url, env) == proxy


async def test_every_request_and_watch_goes_through_the_proxy(tmp_path: Path, control_plane: ControlPlane) -> None:
    """The kubeconfig's proxy-url (it wins over the environment, and applies even to loopback, as in kubectl),
    pointed at a listener that notes what it is asked and hangs up: both kinds of request asked it to CONNECT."""
    asked: list[bytes] = []

    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readline())
        writer.close()

    listener = await asyncio.start_server(note, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["proxy-url"] = f"http://127.0.0.1:{port}"
    kubeconfig = tmp_path / "proxied"
    kubeconfig.write_text(yaml.safe_dump(config))
    kube = await Kube.connect(kubeconfig=str(kubeconfig), env={"HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "*"})
    try:
        assert kube.proxy == f"http://127.0.0.1:{port}"
        with pytest.raises(KubeError) as request:
            await kube.get(VIRTUALSERVICES, "default", "aleph")
        after_request = len(asked)
        with pytest.raises(KubeError) as watch:
            async for _ in kube.watch(VIRTUALSERVICES, "default", resource_version="0"):
                pass
    finally:
        await kube.close()
        listener.close()
    assert (request.value.status, watch.value.status) == (0, 0)
    target = control_plane.url.removeprefix("https://").encode()
    assert 0 < after_request < len(asked)  # (aiohttp tries a dropped idempotent request once more)
    assert set(asked) == {b"CONNECT " + target + b" HTTP/1.1\r\n"}
