"""What every notification says, shared by the services: the headline, the facts, the outcome's colour and icon.

Each service module lays these out in its own format (Block Kit, an Adaptive Card, an embed, a card, an email).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from birdwatch.notify import Moment, Notice

# The free-text part is cut well before any service's limit (Slack: 3000 per section, Discord: 4096 per
# description) so that the headline always fits and a notice is never refused for its length.
MAX_MESSAGE_CHARS: Final = 2000


@dataclass(frozen=True, kw_only=True)
class Look:
    """How a moment looks: a Slack-style emoji, a unicode icon for services without emoji codes, an RGB colour,
    and the tone Adaptive Cards and Google Chat understand."""

    emoji: str
    icon: str
    colour: int
    tone: str  # good, warning, attention, accent (Adaptive Card colours)


LOOKS: Final[Mapping[Moment, Look]] = types.MappingProxyType(
    {
        Moment.STARTED: Look(emoji=":hatching_chick:", icon="🐣", colour=0x439FE0, tone="accent"),
        Moment.STEP: Look(emoji=":arrow_up:", icon="⬆️", colour=0x439FE0, tone="accent"),
        Moment.CHECK_FAILED: Look(emoji=":mag:", icon="🔍", colour=0xDAA038, tone="warning"),
        Moment.UNHEALTHY: Look(emoji=":warning:", icon="⚠️", colour=0xDAA038, tone="warning"),
        Moment.ROLLED_BACK: Look(emoji=":rewind:", icon="⏪", colour=0xD00000, tone="attention"),
        Moment.FROZEN: Look(emoji=":ice_cube:", icon="🧊", colour=0x7FB3D5, tone="warning"),
        Moment.PROMOTED: Look(emoji=":rocket:", icon="🚀", colour=0x2EB886, tone="good"),
        Moment.FAILED: Look(emoji=":x:", icon="❌", colour=0xD00000, tone="attention"),
    }
)

HEADLINES: Final[Mapping[Moment, str]] = types.MappingProxyType(
    {
        Moment.STARTED: "rollout started",
        Moment.STEP: "traffic shifted",
        Moment.CHECK_FAILED: "check failed",
        Moment.UNHEALTHY: "canary unhealthy",
        Moment.ROLLED_BACK: "rolled back",
        Moment.FROZEN: "frozen",
        Moment.PROMOTED: "promoted",
        Moment.FAILED: "rollout failed",
    }
)


def number(value: float) -> str:
    return f"{value:g}"


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def known(notice: Notice) -> bool:
    """A BirdWatch whose spec could not be read has no canary to speak of."""
    return bool(notice.canary_version or notice.service)


def who(notice: Notice) -> str:
    return f"{notice.namespace}/{notice.name}"


def title(notice: Notice) -> str:
    """``shop/reviews: canary v2 of reviews at 20% — promoted``, without markup."""
    text = f"{who(notice)}: "
    if known(notice):
        text += f"canary {notice.canary_version} of {notice.service} at {notice.weight}% — "
    return text + HEADLINES[notice.moment]


def reading(notice: Notice) -> str:
    """``value 0.31 vs baseline 0.02`` (or ``vs production 0.02``), or "" when neither is known."""
    if notice.value is not None and notice.production_value is not None:
        return f"value {number(notice.value)} vs production {number(notice.production_value)}"
    if notice.value is not None and notice.baseline is not None:
        return f"value {number(notice.value)} vs baseline {number(notice.baseline)}"
    if notice.value is not None:
        return f"value {number(notice.value)}"
    if notice.baseline is not None:
        return f"baseline {number(notice.baseline)}"
    return ""


def message(notice: Notice) -> str:
    return shorten(notice.message, MAX_MESSAGE_CHARS)


def facts(notice: Notice) -> list[tuple[str, str]]:
    """Name-value pairs every service shows: namespace, BirdWatch, service, canary, weight, value, next."""
    pairs = [("Namespace", notice.namespace), ("BirdWatch", notice.name)]
    if known(notice):
        pairs += [
            ("Service", notice.service),
            ("Canary", notice.canary_version),
            ("Weight", f"{notice.weight}%"),
        ]
    if reading(notice):
        pairs.append(("Value", reading(notice)))
    if notice.next_step:
        pairs.append(("Next", notice.next_step))
    return pairs


def plain(notice: Notice) -> str:
    """The whole notice as plain text: headline, message, then the facts a line each (email, fallbacks)."""
    lines = [f"{LOOKS[notice.moment].icon} {title(notice)}"]
    if notice.message:
        lines.append(message(notice))
    lines.append("")
    lines += [f"{name}: {value}" for name, value in facts(notice)]
    lines.append(f"Moment: {notice.moment.value}")
    return "\n".join(lines)
