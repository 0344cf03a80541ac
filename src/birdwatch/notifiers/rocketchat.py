"""Rocket.Chat, through an integration's incoming webhook (``/hooks/<id>/<token>``): an attachment coloured by
outcome. Rocket.Chat answers ``{"success": true}``."""

from __future__ import annotations

from typing import Any

from birdwatch.notify import Notice

from .attachments import attachment
from .text import LOOKS, title


def body(notice: Notice, *, channel: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "alias": "birdwatch",
        "text": f"{LOOKS[notice.moment].icon} {title(notice)}",
        "attachments": [attachment(notice)],
    }
    if channel:
        payload["channel"] = channel
    return payload
