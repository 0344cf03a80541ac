"""What a running canary task hears of its BirdWatch after it started: a person's request (the annotation
``birdwatch.otomato.link/request``), and a wake-up when it changes or the task is asked to stop."""

from __future__ import annotations

import asyncio

from .kube import Obj

REQUEST_ANNOTATION = "birdwatch.otomato.link/request"


def request_of(obj: Obj) -> str:
    """The request annotation's value ('' for none)."""
    return str(((obj.get("metadata") or {}).get("annotations") or {}).get(REQUEST_ANNOTATION) or "").strip()


def unacknowledged_request(obj: Obj) -> str:
    """The request on ``obj`` that its status has not acknowledged yet ('' for none)."""
    request = request_of(obj)
    acknowledged = ((obj.get("status") or {}).get("request") or {}).get("id")
    return request if request and request != acknowledged else ""


class Updates:
    """What a running task hears of its BirdWatch after it started: the latest request, and a wake-up."""

    def __init__(self, obj: Obj) -> None:
        self.request = request_of(obj)
        self.changed = asyncio.Event()

    def see(self, obj: Obj) -> None:
        request = request_of(obj)
        if request != self.request:
            self.request = request
            self.changed.set()
