"""A generic webhook for a user's own service: each notice as a CloudEvents 1.0 structured event (JSON), signed.

The body is ``application/cloudevents+json``, made by the ``cloudevents`` package: ``type``
``link.otomato.birdwatch.rollout.<moment>`` (``started``, ``step``, ``promoted``, ...), ``source`` the BirdWatch's
API path, ``subject`` its name, ``id`` one UUID per notice (kept across retries, so a receiver can drop repeats)
and ``data`` the notice's fields. With a secret, ``X-Birdwatch-Signature-256: sha256=<hex>`` is the HMAC-SHA256 of
the exact body with that secret (as GitHub signs its webhooks): a receiver recomputes it before trusting the event.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any

from cloudevents.core.bindings.http import to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from birdwatch.notify import Notice
from birdwatch.spec import GROUP, PLURAL, VERSION

from .delivery import Verdict
from .http import WebhookClient

SIGNATURE_HEADER = "X-Birdwatch-Signature-256"
TYPE_PREFIX = "link.otomato.birdwatch.rollout."


def event(notice: Notice, *, event_id: str) -> CloudEvent:
    data: dict[str, Any] = {
        "moment": notice.moment.value,
        "namespace": notice.namespace,
        "birdwatch": notice.name,
        "uid": notice.uid,
        "generation": notice.generation,
        "service": notice.service,
        "canaryVersion": notice.canary_version,
        "weight": notice.weight,
        "value": notice.value,
        "baseline": notice.baseline,
        "productionValue": notice.production_value,
        "message": notice.message,
        "next": notice.next_step,
    }
    attributes: dict[str, Any] = {
        "id": event_id,
        "type": TYPE_PREFIX + notice.moment.key,
        "source": f"/apis/{GROUP}/{VERSION}/namespaces/{notice.namespace}/{PLURAL}/{notice.name}",
        "subject": notice.name,
        "datacontenttype": "application/json",
    }
    return CloudEvent(attributes=attributes, data=data)


def sign(body: bytes, secret: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSender:
    kind = "webhook"

    def __init__(self, *, url: str, secret: str | None, timeout: float) -> None:
        self._secret = secret.encode() if secret else None
        self._client = WebhookClient(url=url, timeout=timeout, secrets=(secret,) if secret else ())
        self._prepared: tuple[Notice, bytes, dict[str, str]] | None = None

    def __repr__(self) -> str:
        return f"WebhookSender({self._client!r}, signed={self._secret is not None})"

    async def open(self) -> None:
        await self._client.open()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, notice: Notice) -> None:
        # The same event (id, time, signature) for every attempt at one notice.
        if self._prepared is None or self._prepared[0] is not notice:
            message = to_structured(event(notice, event_id=str(uuid.uuid4())), JSONFormat())
            headers = {k: v for k, v in message.headers.items() if k.lower() != "content-type"}
            if self._secret is not None:
                headers[SIGNATURE_HEADER] = sign(message.body, self._secret)
            self._prepared = (notice, message.body, headers)
        _, body, headers = self._prepared
        await self._client.post(body, content_type=JSONFormat().get_content_type(), headers=headers)
        self._prepared = None

    def judge(self, exc: BaseException) -> Verdict:
        return self._client.judge(exc)
