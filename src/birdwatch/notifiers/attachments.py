"""The message attachment Mattermost and Rocket.Chat both take from an incoming webhook (Slack's legacy format):
a coloured bar, a title, the text and short fields."""

from __future__ import annotations

from typing import Any

from birdwatch.notify import Notice

from .text import LOOKS, facts, message, title


def attachment(notice: Notice) -> dict[str, Any]:
    look = LOOKS[notice.moment]
    return {
        "fallback": f"{look.icon} {title(notice)}",
        "color": f"#{look.colour:06X}",
        "title": f"{look.icon} {title(notice)}",
        "text": message(notice),
        "fields": [{"title": k, "value": v, "short": k != "Next"} for k, v in facts(notice)],
    }
