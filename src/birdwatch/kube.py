"""A lean asynchronous Kubernetes REST client on kubernetes_asyncio's configuration.

kubernetes_asyncio loads the credentials (kubeconfig, in-cluster service account, exec plugins, token refresh);
requests go through one aiohttp session set up with the same TLS. The generated API classes spend ~1 ms of CPU per
call on (de)serialisation and parameter handling, about 5x a bare request, and their session looks up proxies and
.netrc in a worker thread on every request; a canary step makes three calls. Going direct also gives one place where
HTTP statuses become typed errors, and a watch with a read timeout.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from yarl import URL

from .errors import ConfigError
from .http11 import Http11Pool

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


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
    """An API call failed. ``status`` is the HTTP status (0 for a transport failure)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        """Worth trying again as it is: transport failures, throttling and server-side errors."""
        return self.status == 0 or self.status == 429 or self.status >= 500


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: the object changed since the resourceVersion the write was computed from (or already exists)."""


class Gone(KubeError):
    """410: the resourceVersion a watch asked for is too old; LIST again."""


class Invalid(KubeError):
    """422: the API server's validation (schema, CEL) refused the object."""


def _error(status: int, body: bytes) -> KubeError:
    try:
        parsed = json.loads(body)
        reason, message = str(parsed.get("reason", "")), str(parsed.get("message", ""))
    except (ValueError, AttributeError):
        reason, message = "", body[:300].decode(errors="replace")
    kind = {404: NotFound, 409: Conflict, 410: Gone, 422: Invalid}.get(status, KubeError)
    return kind(status, reason or "Error", message)


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: Obj


class Kube:
    """The API calls birdwatch makes; every method raises a ``KubeError`` subclass on failure."""

    def __init__(self, configuration: k8s.Configuration, *, pool_size: int = 64, request_timeout: float = 30.0) -> None:
        self._config = configuration
        self._host = str(configuration.host or "").rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=10)
        self._server_hostname: str | None = configuration.tls_server_name or None
        # Resolved once: aiohttp's trust_env (kubernetes_asyncio's default) looks up proxies and .netrc in a
        # thread for every request, which cost more CPU than the request itself in the benchmark.
        self._proxy: str | None = configuration.proxy or _env_proxy(self._host)
        context = _ssl_context(configuration)
        # Short requests go through a lean keep-alive client (see http11); watches, which stream, through aiohttp.
        self._pool = (
            None
            if self._proxy
            else Http11Pool(self._host, ssl_context=context, server_hostname=self._server_hostname, size=pool_size)
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size, ssl=context),
            read_bufsize=2**21,  # a watch event carries a whole object; etcd allows 1.5 MiB
            cookie_jar=aiohttp.DummyCookieJar(),  # the API server sets no cookies; skip the jar's work
        )

    @classmethod
    async def connect(cls, *, kubeconfig: str | None, context: str | None = None, pool_size: int = 64) -> Kube:
        """Credentials from ``kubeconfig``, else in-cluster, else ``~/.kube/config`` (kubectl's order)."""
        configuration = k8s.Configuration()
        try:
            if kubeconfig:
                await k8s_config.load_kube_config(
                    config_file=kubeconfig, context=context, client_configuration=configuration
                )
            else:
                try:
                    k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
                except k8s_config.ConfigException:
                    await k8s_config.load_kube_config(context=context, client_configuration=configuration)
            return cls(configuration, pool_size=pool_size)  # reads the certificate files the kubeconfig names
        except Exception as exc:
            # The loader raises ConfigException, YAML errors, OSError and, for a file that is not a mapping,
            # TypeError; the TLS set-up ssl.SSLError. Whichever it is, the credentials are unusable: bad
            # configuration, said in one line.
            where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster credentials or ~/.kube/config"
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"cannot load Kubernetes credentials from {where}: {reason}") from None

    @property
    def host(self) -> str:
        return self._host

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        await self._session.close()

    async def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "birdwatch"}
        if content_type:
            headers["Content-Type"] = content_type
        # Runs the token refresh hook, so rotated service-account tokens and exec credentials keep working.
        token = await self._config.get_api_key_with_prefix("BearerToken")
        if token:
            headers["Authorization"] = token
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Obj | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        headers = await self._headers(content_type if data is not None else None)
        if self._pool is not None:
            target = path + ("?" + urlencode(params) if params else "")
            try:
                response = await self._pool.request(
                    method,
                    target,
                    headers=headers,
                    body=None if data is None else data.encode(),
                    timeout=self._timeout.total or 30.0,
                )
            except (OSError, TimeoutError) as exc:
                raise KubeError(0, "Unreachable", f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            status, raw = response.status, response.body
        else:
            try:
                async with self._session.request(
                    method,
                    self._host + path,
                    data=data,
                    params=params,
                    headers=headers,
                    timeout=self._timeout,
                    proxy=self._proxy,
                    server_hostname=self._server_hostname,
                ) as resp:
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise KubeError(0, "Unreachable", f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if status >= 400:
            raise _error(status, raw)
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
        self, resource: Resource, namespace: str, name: str, patch: Obj, *, subresource: str | None = None
    ) -> Obj:
        """A JSON merge-patch; put ``metadata.resourceVersion`` in ``patch`` to make it conditional (409)."""
        return await self.request(
            "PATCH", resource.path(namespace, name, subresource), body=patch, content_type=MERGE_PATCH
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
    ) -> AsyncIterator[WatchEvent]:
        """Stream events from ``resource_version`` until the server ends the watch (after ``timeout_seconds``).

        A stream silent for ``read_timeout`` seconds raises ``KubeError`` (bookmarks arrive about once a minute,
        so silence means a dead connection). An ERROR event becomes ``Gone`` (410) or ``KubeError``.
        """
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        headers = await self._headers(None)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout)
        path = resource.path(namespace)
        try:
            async with self._session.get(
                self._host + path,
                params=params,
                headers=headers,
                timeout=timeout,
                proxy=self._proxy,
                server_hostname=self._server_hostname,
            ) as resp:
                if resp.status >= 400:
                    raise _error(resp.status, await resp.read())
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type", ""), event.get("object") or {}
                    if kind == "ERROR":
                        status = int(obj.get("code") or 500)
                        raise _error(status, json.dumps(obj).encode())
                    yield WatchEvent(kind, _without_managed_fields(obj))
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise KubeError(0, "WatchBroken", f"watch {path}: {type(exc).__name__}: {exc}") from exc


def _ssl_context(configuration: k8s.Configuration) -> ssl.SSLContext:
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


def _env_proxy(host: str) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY for the API server, unless NO_PROXY exempts it (as kubectl does)."""
    try:
        proxy, _ = get_env_proxy_for_url(URL(host))
    except LookupError:
        return None
    return str(proxy)


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
