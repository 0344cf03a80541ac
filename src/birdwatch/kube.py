"""A lean asynchronous Kubernetes REST client on kubernetes_asyncio's configuration.

kubernetes_asyncio loads the credentials (kubeconfig with exec plugins, OIDC and token files, or the in-cluster
service account); every request, short or a watch, goes through one aiohttp session with the same TLS. The
generated API classes spend ~1 ms of CPU per call on (de)serialisation and parameter handling, about 5x a bare
request, and their session looks up proxies and .netrc in a worker thread on every request; a canary step makes
three calls. Going direct also gives one place where HTTP statuses become typed errors, credentials are refreshed,
and a watch gets a read timeout. Only kubernetes_asyncio's configuration modules are loaded, not its generated
client (``kubeconfig_import.py``: 38 MB of RSS birdwatch never used).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
import yaml
from yarl import URL

from .errors import ConfigError
from .kubeconfig_import import ConfigException, Configuration, KubeConfigLoader, KubeConfigMerger, load_incluster_config

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")  # where the kubelet puts a pod's token

log = structlog.get_logger("birdwatch.kube")


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


BIRDWATCHES = Resource("otomato.link", "v1alpha1", "birdwatches", "BirdWatch")
VIRTUALSERVICES = Resource("networking.istio.io", "v1", "virtualservices", "VirtualService")
DESTINATIONRULES = Resource("networking.istio.io", "v1", "destinationrules", "DestinationRule")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
EVENTS = Resource("", "v1", "events", "Event")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")


class KubeError(Exception):
    """An API call failed. ``status`` is the HTTP status (0 for a transport failure); ``method`` and ``path`` say
    which request, when the client made it (``""`` for an error built elsewhere)."""

    def __init__(self, status: int, reason: str, message: str, *, method: str = "", path: str = "") -> None:
        request = f"{method} {path}: " if method and not status else ""
        super().__init__(f"{status} {reason}: {message}" if status else request + message)
        self.status = status
        self.reason = reason
        self.message = message
        self.method = method
        self.path = path

    @property
    def retryable(self) -> bool:
        """Worth trying again as it is: transport failures, throttling and server-side errors."""
        return self.status == 0 or self.status == 429 or self.status >= 500

    def describe(self) -> str:
        """One line for a person: what was asked and what the API server said, e.g.
        ``PATCH virtualservices "aleph" in namespace shop: 403 Forbidden: <the API server's message>``."""
        what = describe_request(self.method, self.path)
        said = f"{self.status} {self.reason}: {self.message}" if self.status else f"{self.reason}: {self.message}"
        return " ".join(f"{what}: {said}".split()) if what else " ".join(said.split())


class Unauthorized(KubeError):
    """401: the API server did not accept the credentials (after one refresh and retry)."""


class Forbidden(KubeError):
    """403: the credentials are fine, but RBAC does not allow this verb on this resource."""


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: the object changed since the resourceVersion the write was computed from (or already exists)."""


class Gone(KubeError):
    """410: the resourceVersion a watch asked for is too old; LIST again."""


class Invalid(KubeError):
    """422: the API server's validation (schema, CEL) refused the object."""


_KINDS: dict[int, type[KubeError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Invalid,
}


def _error(status: int, body: bytes, *, method: str, path: str) -> KubeError:
    try:
        parsed = json.loads(body)
        reason, message = str(parsed.get("reason", "")), str(parsed.get("message", ""))
    except (ValueError, AttributeError):
        reason, message = "", body[:300].decode(errors="replace")
    return _KINDS.get(status, KubeError)(status, reason or "Error", message, method=method, path=path)


def describe_request(method: str, path: str) -> str:
    """``PATCH /apis/g/v1/namespaces/shop/virtualservices/aleph`` as ``PATCH virtualservices "aleph" in namespace
    shop``: the words RBAC and kubectl use. Paths that are not a resource's come back as they are."""
    if not method:
        return path
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    # /api/v1/... or /apis/<group>/<version>/...
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:] if parts[:1] == ["apis"] else None
    if not rest:
        return f"{method} {path}".rstrip()
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2:
        namespace, rest = rest[1], rest[2:]
    plural, name, sub = rest[0], rest[1] if len(rest) > 1 else None, "/".join(rest[2:])
    text = f"{method} {plural}{'/' + sub if sub else ''}"
    if name:
        text += f' "{name}"'
    return text + (f" in namespace {namespace}" if namespace else "")


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: Obj


# --- credentials ------------------------------------------------------------------------------------------------

Reload = Callable[[], Awaitable["datetime.datetime | None"]]


class Credentials:
    """The Authorization header of every request, kept valid.

    kubernetes_asyncio's loaders know how to get a credential (run the exec plugin, read the token file, refresh
    OIDC, re-read the in-cluster token through ``refresh_api_key_hook``); this class decides when. A credential
    with an expiry (an exec plugin's ``expirationTimestamp``) is refreshed in the background, by a timer, a fifth
    of its lifetime (at most five minutes) before it ends, so requests do not wait for the plugin; a token file is
    re-read when it changes; a 401 refreshes once for every request that carried the refused credential.
    Refreshes are single-flight: hundreds of requests refused at once make one plugin call. (kubernetes_asyncio's
    own ``refresh_token()`` is a loop on a fixed interval that knows neither the expiry nor a 401 nor a token
    file; this calls the same loader method, ``load_and_set`` and through it ``load_from_exec_plugin``, when due.)
    """

    def __init__(
        self,
        configuration: Configuration,
        *,
        reload: Reload | None = None,
        token_file: Path | None = None,
        expiry: datetime.datetime | None = None,
    ) -> None:
        self._config = configuration
        self._reload = reload
        self._token_file = token_file
        self._file_seen = _file_identity(token_file)
        self._file_checked = time.monotonic()
        self._refreshing: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refreshed_at = -1.0
        self._due = self._expires = float("inf")
        self._schedule(expiry)
        self.refreshes = 0  # how many times the loader was asked for a new credential

    async def authorization(self) -> str | None:
        """The header value (``Bearer ...``, ``Basic ...``), or None (a client certificate only)."""
        now = time.monotonic()
        if now >= self._due:  # the timer's refresh failed, or has not run yet
            if now >= self._expires:
                await self._single_flight()  # expired: no point sending it
            else:
                self._start_refresh()  # still valid: refresh behind the requests
        if self._token_file is not None and now - self._file_checked >= 1.0:
            self._file_checked = now
            if _file_identity(self._token_file) != self._file_seen:
                await self._single_flight()
        # Runs the in-cluster loader's refresh hook, which re-reads the service-account token every minute.
        header: str | None = await self._config.get_api_key_with_prefix("BearerToken")
        return header

    async def after_unauthorized(self, refused: str | None) -> bool:
        """A request carrying ``refused`` got 401: refresh (once, however many ask) unless that already
        happened, and say whether there is now a different credential worth one retry."""
        if self._reload is None:
            return False
        if self._current() == refused and (
            (self._refreshing is not None and not self._refreshing.done())
            # A credential refreshed less than a second ago and refused again is not refreshed once more for
            # every refused request: the refresh gave what the loader has.
            or time.monotonic() - self._refreshed_at > 1.0
        ):
            await self._single_flight()
        return self._current() != refused

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing

    def _current(self) -> str | None:
        key = self._config.api_key.get("BearerToken")
        prefix = self._config.api_key_prefix.get("BearerToken")
        return f"{prefix} {key}" if key and prefix else key

    def _start_refresh(self) -> asyncio.Task[None] | None:
        if self._reload is None:
            return None
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh(), name="kube-credentials-refresh")
        return self._refreshing

    async def _single_flight(self) -> None:
        task = self._start_refresh()
        if task is not None:
            # shield: a caller cancelled while waiting must not cancel the refresh the others wait for.
            await asyncio.shield(task)

    async def _refresh(self) -> None:
        assert self._reload is not None
        self.refreshes += 1
        try:
            expiry = await self._reload()
        except Exception as exc:  # a failing plugin or unreadable file: keep the old credential, try again soon
            left = self._expires - time.monotonic()
            retry = min(5.0, max(0.5, left / 2)) if left > 0 else 1.0
            self._due = time.monotonic() + retry
            self._set_timer(retry)
            log.warning("refreshing Kubernetes credentials failed", error=_one_line(exc), retry_in=retry)
            return
        finally:
            self._refreshed_at = time.monotonic()
            self._file_seen = _file_identity(self._token_file)
        self._schedule(expiry)

    def _schedule(self, expiry: datetime.datetime | None) -> None:
        if expiry is None or self._reload is None:
            self._due = self._expires = float("inf")
            self._set_timer(None)
            return
        lifetime = (expiry - datetime.datetime.now(datetime.UTC)).total_seconds()
        ahead = lifetime - min(300.0, max(lifetime, 0.0) / 5)
        now = time.monotonic()
        self._expires, self._due = now + lifetime, now + ahead
        self._set_timer(ahead)

    def _set_timer(self, delay: float | None) -> None:
        # A timer, not a task: nothing waits while the credential is good, and close() cancels it.
        if self._timer is not None:
            self._timer.cancel()
        self._timer = (
            None if delay is None else asyncio.get_running_loop().call_later(max(delay, 0.0), self._start_refresh)
        )


def _file_identity(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# --- the client ---------------------------------------------------------------------------------------------------


class Kube:
    """The API calls birdwatch makes; every method raises a ``KubeError`` subclass on failure."""

    def __init__(
        self,
        configuration: Configuration,
        *,
        pool_size: int = 16,
        request_timeout: float = 30.0,
        credentials: Credentials | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._config = configuration
        self._host = str(configuration.host or "").rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=10)
        self._server_hostname: str | None = configuration.tls_server_name or None
        self.credentials = credentials or Credentials(configuration)
        # Resolved once, as kubectl does: the kubeconfig's proxy-url, else HTTPS_PROXY / HTTP_PROXY unless
        # NO_PROXY exempts the host. aiohttp's trust_env would look proxies and .netrc up in a worker thread for
        # every request, which cost more CPU than the request itself in the benchmark.
        proxy = configuration.proxy or proxy_from_environment(self._host, os.environ if env is None else env)
        self._proxy, self._proxy_headers = _split_proxy_auth(proxy)
        # Every TLS connection costs about 290 kB of RSS (asyncio's SSLProtocol allocates a 256 KiB read buffer),
        # and a connection is opened for each request in flight: canaries that step at the same moment held one
        # each, 15 MB at 50 canaries. So short requests take turns on ``pool_size`` connections (an HTTP/2 client
        # such as client-go uses one); watches hold a connection each outside that bound, so however many scopes
        # are watched, they never starve the requests nor wait for them.
        self._in_flight = asyncio.Semaphore(pool_size)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=_ssl_context(configuration)),
            timeout=self._timeout,
            read_bufsize=2**21,  # a watch event carries a whole object; etcd allows 1.5 MiB
            cookie_jar=aiohttp.DummyCookieJar(),  # the API server sets no cookies; skip the jar's work
            trust_env=False,
        )

    @classmethod
    async def connect(
        cls,
        *,
        kubeconfig: str | None,
        context: str | None = None,
        pool_size: int = 16,
        env: Mapping[str, str] | None = None,
        service_account: Path = SERVICE_ACCOUNT,
    ) -> Kube:
        """Credentials as controller-runtime finds them: ``kubeconfig``, else ``$KUBECONFIG`` (a list of files,
        merged as kubectl merges them), else in-cluster (``$KUBERNETES_SERVICE_HOST`` and the ``token`` and
        ``ca.crt`` in ``service_account``), else ``~/.kube/config``. Raises ConfigError."""
        env = os.environ if env is None else env
        in_cluster_files = {
            "environ": env,
            "token_filename": str(service_account / "token"),
            "cert_filename": str(service_account / "ca.crt"),
        }
        configuration = Configuration()
        if kubeconfig:
            origin, paths = f"--kubeconfig {kubeconfig}", [kubeconfig]
        elif env.get("KUBECONFIG", "").strip():
            value = env["KUBECONFIG"].strip()
            origin, paths = f"$KUBECONFIG {value}", [p for p in value.split(os.pathsep) if p.strip()]
        else:
            try:
                load_incluster_config(client_configuration=configuration, **in_cluster_files)  # type: ignore[no-untyped-call]
            except ConfigException as exc:
                in_cluster = f"not in a cluster ({str(exc).rstrip('.')})"
            else:

                async def reload_in_cluster() -> None:
                    # Forced after a 401; the refresh hook the loader installs re-reads the token every minute.
                    load_incluster_config(client_configuration=configuration, **in_cluster_files)  # type: ignore[no-untyped-call]

                return cls._build(configuration, "in-cluster credentials", pool_size, env, reload=reload_in_cluster)
            home = Path(env.get("HOME") or Path.home()) / ".kube" / "config"
            if not home.exists():
                raise ConfigError(
                    f"no Kubernetes credentials: {in_cluster}, and {home} does not exist; "
                    "name a kubeconfig with --kubeconfig or $KUBECONFIG"
                )
            origin, paths = str(home), [str(home)]
        loader, reload, token_file = await _load_kubeconfig(
            paths, origin=origin, explicit=bool(kubeconfig), context=context, configuration=configuration
        )
        return cls._build(configuration, origin, pool_size, env, reload=reload, token_file=token_file, loader=loader)

    @classmethod
    def _build(
        cls,
        configuration: Configuration,
        origin: str,
        pool_size: int,
        env: Mapping[str, str],
        *,
        reload: Reload | None,
        token_file: Path | None = None,
        loader: KubeConfigLoader | None = None,
    ) -> Kube:
        try:
            credentials = Credentials(configuration, reload=reload, token_file=token_file, expiry=_exec_expiry(loader))
            return cls(configuration, pool_size=pool_size, credentials=credentials, env=env)  # reads certificates
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load Kubernetes credentials from {origin}: {_one_line(exc)}") from None

    @property
    def host(self) -> str:
        return self._host

    @property
    def proxy(self) -> str | None:
        """The proxy every request goes through (None: direct)."""
        return self._proxy

    async def close(self) -> None:
        await self.credentials.close()
        await self._session.close()

    async def _headers(self, content_type: str | None) -> tuple[dict[str, str], str | None]:
        headers = {"Accept": "application/json", "User-Agent": "birdwatch"}
        if content_type:
            headers["Content-Type"] = content_type
        token = await self.credentials.authorization()
        if token:
            headers["Authorization"] = token
        return headers, token

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Obj | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        decode: bool = True,
    ) -> Obj:
        """The answer, decoded; ``decode=False``: {} (for a write whose answer nobody reads, e.g. a status write,
        decoding a whole object each step is wasted work). Errors raise either way."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        url = URL(self._host + path + ("?" + urlencode(params) if params else ""), encoded=True)
        for attempt in (0, 1):
            headers, sent = await self._headers(content_type if data is not None else None)
            try:
                async with (
                    self._in_flight,
                    self._session.request(
                        method,
                        url,
                        data=data,
                        headers=headers,
                        proxy=self._proxy,
                        proxy_headers=self._proxy_headers,
                        server_hostname=self._server_hostname,
                    ) as resp,
                ):
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise KubeError(0, "Unreachable", f"{type(exc).__name__}: {exc}", method=method, path=path) from exc
            # A 401 is refused before the server does anything, so even a POST may be sent again.
            if status == 401 and attempt == 0 and await self.credentials.after_unauthorized(sent):
                continue
            break
        if status >= 400:
            raise _error(status, raw, method=method, path=path)
        if not decode:
            return {}
        result: Obj = json.loads(raw) if raw else {}
        return _without_managed_fields(result)

    async def get(self, resource: Resource, namespace: str | None, name: str) -> Obj:
        return await self.request("GET", resource.path(namespace, name))

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        page_size: int = 500,
    ) -> tuple[list[Obj], str]:
        """All items (paged) and the list's resourceVersion, to watch from."""
        items: list[Obj] = []
        params: dict[str, str] = {"limit": str(page_size)}
        if label_selector:
            params["labelSelector"] = label_selector
        while True:
            page = await self.request("GET", resource.path(namespace), params=params)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion", ""))
            params["continue"] = meta["continue"]

    async def merge_patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        patch: Obj,
        *,
        subresource: str | None = None,
        decode: bool = True,
    ) -> Obj:
        """A JSON merge-patch; put ``metadata.resourceVersion`` in ``patch`` to make it conditional (409).
        ``decode=False``: the answer is not decoded, and {} returned."""
        return await self.request(
            "PATCH", resource.path(namespace, name, subresource), body=patch, content_type=MERGE_PATCH, decode=decode
        )

    async def create(self, resource: Resource, namespace: str | None, obj: Obj) -> Obj:
        return await self.request("POST", resource.path(namespace), body=obj)

    async def replace(self, resource: Resource, namespace: str | None, name: str, obj: Obj) -> Obj:
        return await self.request("PUT", resource.path(namespace, name), body=obj)

    async def delete(self, resource: Resource, namespace: str | None, name: str) -> Obj:
        return await self.request("DELETE", resource.path(namespace, name))

    async def watch(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        resource_version: str,
        timeout_seconds: int = 300,
        read_timeout: float = 90.0,
        wanted: Callable[[bytes], bool] | None = None,
        label_selector: str | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Stream events from ``resource_version`` until the server ends the watch (after ``timeout_seconds``).

        ``wanted`` looks at each event's raw line first: an event it declines is not decoded (bookmarks and
        errors always are, so the resourceVersion still advances and failures still raise).

        A stream silent for ``read_timeout`` seconds raises ``KubeError`` (bookmarks arrive about once a minute,
        so silence means a dead connection). An ERROR event becomes ``Gone`` (410) or ``KubeError``.

        With ``label_selector`` the server sends only matching objects: one that stops matching (relabelled) comes
        as DELETED, with its content from before, one that starts to as ADDED.
        """
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout)
        path = resource.path(namespace)
        url = URL(self._host + path + "?" + urlencode(params), encoded=True)
        try:
            for attempt in (0, 1):
                headers, sent = await self._headers(None)
                async with self._session.get(
                    url,
                    headers=headers,
                    timeout=timeout,
                    proxy=self._proxy,
                    proxy_headers=self._proxy_headers,
                    server_hostname=self._server_hostname,
                ) as resp:
                    if resp.status == 401 and attempt == 0:
                        await resp.read()
                        if await self.credentials.after_unauthorized(sent):
                            continue
                    if resp.status >= 400:
                        raise _error(resp.status, await resp.read(), method="GET", path=path)
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        if wanted is not None and not (b'"BOOKMARK"' in line or b'"ERROR"' in line or wanted(line)):
                            continue
                        event = json.loads(line)
                        kind, obj = event.get("type", ""), event.get("object") or {}
                        if kind == "ERROR":
                            status = int(obj.get("code") or 500)
                            raise _error(status, json.dumps(obj).encode(), method="GET", path=path)
                        yield WatchEvent(kind, _without_managed_fields(obj))
                    return
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise KubeError(0, "WatchBroken", f"{type(exc).__name__}: {exc}", method="GET", path=path) from exc


# --- loading a kubeconfig -----------------------------------------------------------------------------------------


async def _load_kubeconfig(
    paths: list[str], *, origin: str, explicit: bool, context: str | None, configuration: Configuration
) -> tuple[KubeConfigLoader, Reload, Path | None]:
    """kubeconfig files merged as kubectl merges them, loaded by kubernetes_asyncio into ``configuration``.

    kubectl's rules: files in $KUBECONFIG that do not exist are skipped, empty ones too; for every cluster, user
    and context (by name) and for ``current-context`` the first file to set it wins. KubeConfigMerger does the
    first; for current-context it lets the last file win, so the first one's is passed as the active context.
    """
    existing, current = _scan_kubeconfigs(paths, origin=origin, explicit=explicit)
    if not (context or current):
        raise ConfigError(
            f"cannot load Kubernetes credentials from {origin}: no current-context; choose one with --context"
        )
    try:
        merger = KubeConfigMerger(os.pathsep.join(existing))
        loader = KubeConfigLoader(
            config_dict=merger.config,
            config_base_path=None,  # relative paths are relative to the file that names them
            active_context=context or current,
            config_persister=merger.save_changes,  # a refreshed OIDC token is written back, as kubectl does
        )
        await loader.load_and_set(configuration)
    except Exception as exc:
        # The loader raises ConfigException, KeyError, TypeError and OSError for what it cannot use, and logs the
        # exec plugin's failure itself. Whichever it is, the credentials are unusable: bad configuration, one line.
        raise ConfigError(f"cannot load Kubernetes credentials from {origin}: {_one_line(exc)}") from None

    token_file = _token_file(merger, loader)

    async def reload() -> datetime.datetime | None:
        # load_from_exec_plugin runs the plugin only when the credential ends within five minutes; when this is
        # called the credential is due or was refused, so the plugin must run either way.
        loader.__dict__.pop("exec_plugin_expiry", None)
        await loader.load_and_set(configuration)
        return _exec_expiry(loader)

    return loader, reload, token_file


def _scan_kubeconfigs(paths: list[str], *, origin: str, explicit: bool) -> tuple[list[str], str | None]:
    """The files worth merging, and the first current-context set. Reading a few small files at start: sync."""
    existing: list[str] = []
    empty: list[str] = []
    current: str | None = None
    for path in paths:
        full = os.path.expanduser(path.strip())
        if not os.path.exists(full):
            if explicit:
                raise ConfigError(f"{origin}: file does not exist")
            continue
        try:
            doc = yaml.safe_load(Path(full).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot load Kubernetes credentials from {origin}: {path}: {_one_line(exc)}") from None
        if doc is None:
            empty.append(path)
            continue
        if not isinstance(doc, dict):
            raise ConfigError(
                f"cannot load Kubernetes credentials from {origin}: {path} is not a kubeconfig (not a YAML mapping)"
            )
        existing.append(full)
        current = current or (str(doc["current-context"]) if doc.get("current-context") else None)
    if not existing:
        if empty:
            raise ConfigError(f"cannot load Kubernetes credentials from {origin}: {', '.join(empty)} is empty")
        raise ConfigError(f"cannot load Kubernetes credentials from {origin}: no such file")
    return existing, current


def _token_file(merger: KubeConfigMerger, loader: KubeConfigLoader) -> Path | None:
    """The active user's ``tokenFile``, when that is where its credential comes from (no exec plugin, no inline
    token: kubernetes_asyncio's order). A relative path is relative to the file that names it."""
    name = ((loader.current_context or {}).get("context") or {}).get("user")
    users = merger.config.safe_get("users") if merger.config is not None else None
    for node in users or ():
        entry, source = getattr(node, "value", node), getattr(node, "path", None)
        user = entry.get("user") if isinstance(entry, dict) and entry.get("name") == name else None
        if isinstance(user, dict) and "exec" not in user and not user.get("token") and user.get("tokenFile"):
            return Path(os.path.normpath(os.path.join(os.path.dirname(source or ""), str(user["tokenFile"]))))
    return None


def _exec_expiry(loader: KubeConfigLoader | None) -> datetime.datetime | None:
    """When the exec plugin said its token ends (``expirationTimestamp``); None when it did not say."""
    expiry = getattr(loader, "exec_plugin_expiry", None) if loader is not None else None
    return expiry if isinstance(expiry, datetime.datetime) else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- transport ----------------------------------------------------------------------------------------------------


def _ssl_context(configuration: Configuration) -> ssl.SSLContext:
    """TLS as kubernetes_asyncio sets it up from a kubeconfig or in-cluster configuration."""
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, keyfile=configuration.key_file)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.disable_strict_ssl_verification:
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def proxy_from_environment(url: str, env: Mapping[str, str]) -> str | None:
    """The proxy for ``url`` by the rules kubectl follows (Go's net/http ProxyFromEnvironment).

    HTTPS_PROXY (or https_proxy) for https URLs, HTTP_PROXY (http_proxy) for http; a value without a scheme means
    http://. Never for localhost or a loopback address. NO_PROXY (no_proxy) is a comma-separated list of host
    names (matching the name and its subdomains; a leading "." only subdomains), IP addresses, CIDR ranges,
    optionally with a port, or "*" for everything.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    names = ("HTTPS_PROXY", "https_proxy") if parts.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((env[n].strip() for n in names if env.get(n, "").strip()), "")
    if not proxy or not host or host == "localhost" or _is_loopback(host):
        return None
    no_proxy = next((env[n] for n in ("NO_PROXY", "no_proxy") if env.get(n, "").strip()), "")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return None
        if _no_proxy_matches(entry, host, port):
            return None
    return proxy if "://" in proxy else "http://" + proxy


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]+))(?::(?P<port>\d+))?$")


def _no_proxy_matches(entry: str, host: str, port: int) -> bool:
    try:
        network = ipaddress.ip_network(entry, strict=False) if "/" in entry else None
    except ValueError:
        network = None
    if network is not None:
        try:
            return ipaddress.ip_address(host) in network
        except ValueError:
            return False
    match = _HOST_PORT.match(entry)
    if match is None:
        return False
    name = match.group("v6") or match.group("host") or ""
    if match.group("port") and int(match.group("port")) != port:
        return False
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(host)
    except ValueError:
        pass
    if name.startswith("*."):
        name = name[1:]
    if name.startswith("."):
        return host.endswith(name)
    return host == name or host.endswith("." + name)


def _split_proxy_auth(proxy: str | None) -> tuple[str | None, dict[str, str] | None]:
    """aiohttp wants a proxy's credentials as a Proxy-Authorization header, not in the URL."""
    if not proxy:
        return None, None
    parts = urlsplit(proxy)
    if parts.username is None:
        return proxy, None
    auth = aiohttp.BasicAuth(login=unquote(parts.username), password=unquote(parts.password or ""), encoding="utf-8")
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), {"Proxy-Authorization": auth.encode()}


def _without_managed_fields(obj: Obj) -> Obj:
    """Drop ``metadata.managedFields`` (of an object, or of each item of a list). birdwatch never reads them, and
    they are most of a small object's size: kept for every canary they were a third of the controller's memory."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    for item in obj.get("items") or ():
        if isinstance(item, dict) and isinstance(item.get("metadata"), dict):
            item["metadata"].pop("managedFields", None)
    return obj


__all__ = [
    "BIRDWATCHES",
    "DEPLOYMENTS",
    "DESTINATIONRULES",
    "EVENTS",
    "LEASES",
    "MERGE_PATCH",
    "VIRTUALSERVICES",
    "Conflict",
    "Credentials",
    "Forbidden",
    "Gone",
    "Invalid",
    "Kube",
    "KubeError",
    "NotFound",
    "Obj",
    "Resource",
    "Unauthorized",
    "WatchEvent",
    "describe_request",
    "proxy_from_environment",
]
