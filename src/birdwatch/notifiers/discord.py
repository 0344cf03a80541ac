"""Discord, through a channel's webhook: one embed per notice, coloured by outcome, the facts as inline fields.

``?wait=true`` makes Discord answer with the message it created (and an error it would otherwise swallow);
``allowed_mentions`` is empty so text from the cluster can never ping @everyone. Discord's 429 says its wait in
Retry-After (and ``retry_after`` in the body); both are honoured.
"""

from __future__ import annotations

import datetime
from typing import Any

from birdwatch.notify import Notice

from .text import LOOKS, facts, message, shorten, title


def body(notice: Notice) -> dict[str, Any]:
    look = LOOKS[notice.moment]
    embed: dict[str, Any] = {
        "title": shorten(f"{look.icon} {title(notice)}", 256),
        "color": look.colour,
        "fields": [{"name": k, "value": shorten(v, 1024), "inline": k != "Next"} for k, v in facts(notice)],
        "footer": {"text": notice.moment.value},
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if notice.message:
        embed["description"] = shorten(message(notice), 4096)
    return {"username": "birdwatch", "embeds": [embed], "allowed_mentions": {"parse": []}}


def query(notice: Notice) -> dict[str, str]:
    return {"wait": "true"}
