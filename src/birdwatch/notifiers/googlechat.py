"""Google Chat, through a space's incoming webhook: a card (cardsV2) per notice, in a thread per rollout.

The webhook URL carries the space's key and token. ``threadKey`` (the rollout's uid/generation) with
``messageReplyOption=REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD`` makes Google Chat itself keep one thread per rollout,
across restarts of birdwatch, with nothing stored here.
"""

from __future__ import annotations

import html
from typing import Any

from birdwatch.notify import Notice

from .text import LOOKS, facts, message, title


def body(notice: Notice) -> dict[str, Any]:
    look = LOOKS[notice.moment]
    widgets: list[dict[str, Any]] = []
    if notice.message:
        widgets.append(
            {"textParagraph": {"text": f'<font color="#{look.colour:06X}">{html.escape(message(notice))}</font>'}}
        )
    widgets += [{"decoratedText": {"topLabel": k, "text": html.escape(v)}} for k, v in facts(notice)]
    card = {
        "header": {"title": f"{look.icon} {title(notice)}", "subtitle": notice.moment.value},
        "sections": [{"widgets": widgets}],
    }
    return {
        "text": f"{look.icon} {title(notice)}",
        "cardsV2": [{"cardId": f"birdwatch-{notice.moment.value}", "card": card}],
    }


def query(notice: Notice) -> dict[str, str]:
    if not notice.rollout:
        return {}
    return {"threadKey": f"birdwatch-{notice.rollout}", "messageReplyOption": "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"}
