"""The command line: ``birdwatch run`` and ``birdwatch --version``. Bad configuration ends here, in one line, with
exit code 2 — never a traceback."""

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
from .log import configure
from .runner import App

EXIT_CONFIG = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage and the error on two lines; one clear line is easier to find in a pod's log.
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        parser.print_help()
        return EXIT_CONFIG
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"birdwatch: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure(fmt=settings.log_format, level=settings.log_level)
    log = structlog.get_logger("birdwatch")
    log.info(
        "birdwatch starting",
        version=__version__,
        prometheus=settings.prometheus.url,
        namespaces=list(settings.namespaces) or "all",
        leader_elect=settings.leader.enabled,
    )
    try:
        asyncio.run(App(settings).run(handle_signals=True))
    except ConfigError as exc:
        print(f"birdwatch: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
