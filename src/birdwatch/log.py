"""Logging: structlog, one JSON object per line (or readable lines for people), standard library logs included.

Every line goes through one ``logging`` handler and one renderer, birdwatch's own (structlog) and third-party ones
(aiohttp, asyncio, kubernetes_asyncio, Python's warnings, uncaught exceptions) alike, so they carry the same keys
(``timestamp``, ``level``, ``logger``, ``event``) in both formats and, in JSON mode, ``birdwatch run 2>&1 | jq``
never meets a line that is not JSON. A fatal error at start (``fatal_line``) is rendered the same way.

Key convention for every module: ``event`` is the fixed sentence of the line; ``detail`` holds any other human text
(an error's message); ``reason`` only a machine reason in CamelCase, like a Kubernetes Event's (``BadQuery``);
``namespace`` and ``birdwatch`` (its name) say which BirdWatch a line is about, as the metrics' labels do.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
import types
from typing import Any, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "console")
OWN_LOGGER = "birdwatch"  # birdwatch's modules log under birdwatch.<module>


def _renderer(fmt: str) -> structlog.types.Processor:
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False)


def configure(*, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and route it, with the standard library's logging, through one handler and renderer."""
    numeric = logging.getLevelName(level.upper())
    out = stream or sys.stdout
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Console mode prints a traceback below its line (ConsoleRenderer does that); JSON keeps it inside the object.
    final: list[structlog.types.Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        final += [structlog.processors.format_exc_info]
    final.append(_renderer(fmt))
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=final,
            foreign_pre_chain=[*shared, structlog.processors.StackInfoRenderer()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Third-party libraries are chatty at debug; --log-level debug is for birdwatch's own lines.
    root.setLevel(max(numeric, logging.INFO))
    own = logging.getLogger(OWN_LOGGER)
    own.setLevel(numeric)
    own.propagate = True


def capture_process_output() -> None:
    """For the ``birdwatch run`` process only (tests configure logging in-process and keep pytest's hooks):
    Python's warnings and uncaught exceptions (main thread, threads, and those Python can only report, such as a
    failing ``__del__``) become log lines instead of plain text on stderr."""
    logging.captureWarnings(True)
    crash = logging.getLogger(f"{OWN_LOGGER}.crash")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: types.TracebackType | None, /) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        crash.critical("uncaught exception", exc_info=(kind, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        where = args.thread.name if args.thread is not None else "?"
        exc = args.exc_value if args.exc_value is not None else RuntimeError(args.exc_type.__name__)
        crash.error(f"uncaught exception in thread {where}", exc_info=(args.exc_type, exc, args.exc_traceback))

    def unraisable_hook(info: sys.UnraisableHookArgs, /) -> None:
        exc = info.exc_value if info.exc_value is not None else RuntimeError(info.exc_type.__name__)
        crash.error(
            f"exception ignored in {info.object!r}" if info.object is not None else "exception ignored",
            exc_info=(info.exc_type, exc, info.exc_traceback),
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook


def format_hint(argv: list[str], env: dict[str, str]) -> str:
    """The log format the command line asks for, found before (or without) a successful parse, so that an error
    in the arguments themselves is reported in that format: ``--log-format X`` / ``--log-format=X``, else
    ``$BIRDWATCH_LOG_FORMAT``, else JSON (the default). A value that is not a format is ignored."""
    chosen: str | None = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--log-format" and i + 1 < len(argv):
            chosen = argv[i + 1]
        elif arg.startswith("--log-format="):
            chosen = arg.split("=", 1)[1]
    if chosen in FORMATS:
        return chosen
    from_env = env.get("BIRDWATCH_LOG_FORMAT", "").strip()
    return from_env if from_env in FORMATS else "json"


def fatal_line(fmt: str, *, prog: str, detail: str, reason: str, **fields: Any) -> str:
    """The one line that says why birdwatch cannot go on. JSON mode: an object with the same keys as every other
    line (and ``reason``, ``detail``); console mode: ``<prog>: error: <detail>``, as command-line tools say it."""
    if fmt != "json":
        return f"{prog}: error: {detail}"
    # As structlog's TimeStamper(fmt="iso", utc=True) writes it.
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    entry: dict[str, Any] = {
        "event": "birdwatch cannot run",
        "reason": reason,
        "detail": detail,
        **fields,
        "logger": OWN_LOGGER,
        "level": "error",
        "timestamp": now,
    }
    return json.dumps(entry, default=str)
