"""The command line: ``birdwatch run`` and ``birdwatch --version``. Bad configuration ends here, in one line, with
exit code 2 — never a traceback. The line is in the log format asked for (JSON by default), even when the bad
setting is an argument, so that in JSON mode every line birdwatch writes is JSON; an unexpected crash is logged
with its traceback inside one JSON object and exits 1."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import structlog

from . import __version__
from .config import ConfigError, add_run_arguments, settings_from
from .log import capture_process_output, configure, fatal_line, format_hint
from .runner import App

EXIT_CONFIG = 2
EXIT_CRASH = 1
BAD_CONFIGURATION = "BadConfiguration"  # the reason of a fatal line about flags, environment or kubeconfig


class UsageError(ConfigError):
    """A command line argparse refused; ``prog`` is the (sub)command that refused it."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage and the error on two lines, in plain text; main() says it in one line, in the
        # log format asked for.
        raise UsageError(self.prog, f"{message} (see {self.prog} --help)")


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    env = dict(os.environ) if env is None else env
    parser = _Parser(
        prog="birdwatch",
        description="Releases canaries safely on an Istio service mesh: for each BirdWatch resource, shifts "
        "VirtualService traffic to the canary step by step while a Prometheus metric stays near its baseline; "
        "then promotes, rolls back or freezes.",
    )
    parser.add_argument("--version", action="version", version=f"birdwatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="run the controller",
        description="Run the controller: watch BirdWatch resources and carry out their canary releases. "
        "Every flag can also be set through the environment variable shown in [brackets].",
    )
    add_run_arguments(run, env)
    return parser


def _fatal(fmt: str, exc: ConfigError) -> int:
    prog = exc.prog if isinstance(exc, UsageError) else "birdwatch"
    print(fatal_line(fmt, prog=prog, detail=str(exc), reason=BAD_CONFIGURATION, exit_code=EXIT_CONFIG), file=sys.stderr)
    return EXIT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    fmt = format_hint(args_list, dict(os.environ))
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
        if args.command != "run":
            parser.print_help()
            return EXIT_CONFIG
        settings = settings_from(args)
    except ConfigError as exc:
        return _fatal(fmt, exc)
    fmt = settings.log_format
    configure(fmt=fmt, level=settings.log_level)
    capture_process_output()
    log = structlog.get_logger("birdwatch.cli")
    log.info(
        "birdwatch starting",
        version=__version__,
        prometheus=settings.prometheus.url,
        namespaces=list(settings.namespaces) or "all",
        label_selector=settings.label_selector or "all",
        leader_elect=settings.leader.enabled,
    )
    try:
        asyncio.run(App(settings).run(handle_signals=True))
    except ConfigError as exc:
        return _fatal(fmt, exc)
    except Exception as exc:
        # Whatever it was, the traceback belongs in the log (inside the JSON object in JSON mode), not on stderr.
        log.critical("birdwatch stopped on an unexpected error", reason="Crashed", detail=str(exc), exc_info=True)
        return EXIT_CRASH
    return 0


if __name__ == "__main__":
    sys.exit(main())
