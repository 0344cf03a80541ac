"""A webhook token authenticator for the local kube-apiserver, so that tests decide which bearer tokens are valid
and until when.

kube-apiserver sends every bearer token it does not know itself (not a service-account token) to this server as
an ``authentication.k8s.io/v1`` TokenReview (``--authentication-token-webhook-config-file``) and caches the answer
for ``CACHE_TTL``. The server speaks HTTPS with the harness's own CA. Tokens are registered by the test
(``allow``/``revoke``) or by a process outside it, such as a kubeconfig exec plugin, with a POST to ``/tokens``.
A valid token's user is in ``system:masters`` unless the test says otherwise, so RBAC lets it do anything.

kube-apiserver also keeps every *successful* authentication for 10 s, whatever the webhook's TTL (a built-in cache
without a flag; it says so in its log at start): a token that has worked goes on working up to 10 s after it was
revoked or ended. A test that needs a refusal at once uses a token the API server has never accepted.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from .pki import CertificateAuthority

CACHE_TTL = "1s"  # kube-apiserver keeps a review's answer this long: expiry is enforced within a second
GROUPS = ("system:masters",)


class TokenServer:
    """Answers TokenReviews from a table of tokens and their deadlines (wall-clock ``time.time()``)."""

    def __init__(self, folder: Path, authority: CertificateAuthority) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca = authority.cert
        self._pair = authority.issue("tokenauth", common_name="tokenauth", server=True)
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, str, tuple[str, ...]]] = {}  # token -> (valid until, user, groups)
        self._reviews: list[tuple[str, bool]] = []  # (token, authenticated) in the order reviewed
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> TokenServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self._pair.cert), str(self._pair.key))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="tokenauth", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def apiserver_flags(self) -> list[str]:
        """kube-apiserver's flags for this authenticator (the webhook config is a kubeconfig naming the server)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "tokenauth",
                    "cluster": {"server": f"{self.url}/review", "certificate-authority": str(self.ca)},
                }
            ],
            "users": [{"name": "apiserver", "user": {}}],
            "contexts": [{"name": "tokenauth", "context": {"cluster": "tokenauth", "user": "apiserver"}}],
            "current-context": "tokenauth",
        }
        path = self.folder / "webhook.kubeconfig"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [
            f"--authentication-token-webhook-config-file={path}",
            "--authentication-token-webhook-version=v1",
            f"--authentication-token-webhook-cache-ttl={CACHE_TTL}",
        ]

    def allow(self, token: str, *, until: float, user: str = "token-user", groups: tuple[str, ...] = GROUPS) -> None:
        with self._lock:
            self._tokens[token] = (until, user, groups)

    def revoke(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def reviews(self) -> list[tuple[str, bool]]:
        with self._lock:
            return list(self._reviews)

    def review(self, token: str) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            until, user, groups = self._tokens.get(token, (0.0, "", ()))
            valid = until > now
            self._reviews.append((token, valid))
        if not valid:
            return {"authenticated": False, "error": "unknown or expired token"}
        return {"authenticated": True, "user": {"username": user, "uid": user, "groups": list(groups)}}


def _handler(tokens: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: kube-apiserver reuses its connection for reviews

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, {"error": "not JSON"})
                return
            if self.path == "/tokens":
                tokens.allow(str(body["token"]), until=float(body["until"]), user=str(body.get("user") or "token-user"))
                self._send(200, {})
            else:  # the webhook's own URL, whatever the API server's REST client makes of the path
                status = tokens.review(str((body.get("spec") or {}).get("token", "")))
                version = body.get("apiVersion", "authentication.k8s.io/v1")
                self._send(200, {"apiVersion": version, "kind": "TokenReview", "status": status})

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            pass  # one line per review would drown the test output

    return Handler
