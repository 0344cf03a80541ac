"""Mattermost, through an incoming webhook: a message attachment coloured by outcome (Mattermost answers "ok")."""

from __future__ import annotations

from typing import Any

from birdwatch.notify import Notice

from .attachments import attachment


def body(notice: Notice, *, channel: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"username": "birdwatch", "text": "", "attachments": [attachment(notice)]}
    payload["attachments"][0]["footer"] = notice.moment.value
    if channel:
        payload["channel"] = channel
    return payload
