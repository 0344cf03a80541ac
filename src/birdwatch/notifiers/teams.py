"""Microsoft Teams, through a Workflows webhook ("When a Teams webhook request is received"): an Adaptive Card.

The Workflows trigger takes a message with the card as an attachment and answers 202 Accepted; the card's
headline is coloured by outcome (Good, Warning, Attention, Accent) and the facts are a FactSet.
"""

from __future__ import annotations

from typing import Any

from birdwatch.notify import Notice

from .text import LOOKS, facts, message, title

CARD_TYPE = "application/vnd.microsoft.card.adaptive"


def body(notice: Notice) -> dict[str, Any]:
    look = LOOKS[notice.moment]
    blocks: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": f"{look.icon} {title(notice)}",
            "weight": "Bolder",
            "size": "Medium",
            "color": look.tone.capitalize(),
            "wrap": True,
        }
    ]
    if notice.message:
        blocks.append({"type": "TextBlock", "text": message(notice), "wrap": True})
    blocks.append({"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in facts(notice)]})
    blocks.append({"type": "TextBlock", "text": notice.moment.value, "isSubtle": True, "size": "Small"})
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": blocks,
        "msteams": {"width": "Full"},
    }
    return {"type": "message", "attachments": [{"contentType": CARD_TYPE, "contentUrl": None, "content": card}]}
