"""The command line: ``birdwatch-meshsim --namespace NS --service aleph --versions v03,v04 ...``.

Runs until SIGINT or SIGTERM, then stops cleanly (removing its scrape target list) and exits 0. The first line on
stdout says where everything is, e.g. ``meshsim: aleph in demo: v03=127.0.0.1:40001 v04=127.0.0.1:40002; control
http://127.0.0.1:40003; targets /path/meshsim-demo-aleph.json``; then a status line every ``--report-every`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from kubernetes_asyncio.config import ConfigException

from .sim import MeshSim


def _version_values(pairs: Sequence[str], what: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for pair in pairs:
        version, sep, value = pair.partition("=")
        try:
            if not sep or not version:
                raise ValueError
            values[version] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must look like VERSION=NUMBER, not {pair!r}") from None
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="birdwatch-meshsim",
        description="Simulate an Istio mesh for one service: per-version servers with Istio metrics, and load "
        "split by the VirtualService's current weights.",
    )
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default: $KUBECONFIG")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--service", required=True, help="the VirtualService, DestinationRule and service name")
    parser.add_argument("--versions", required=True, help="comma-separated version labels, e.g. v03,v04")
    parser.add_argument("--rps", type=float, default=40.0, help="requests per second sent to the service (40)")
    parser.add_argument(
        "--error-rate",
        action="append",
        default=[],
        metavar="VERSION=RATE",
        help="fraction of that version's requests answered 500, e.g. v05=0.2 (repeatable; default 0)",
    )
    parser.add_argument(
        "--latency",
        action="append",
        default=[],
        metavar="VERSION=MS",
        help="delay that version adds to each request, in milliseconds (repeatable; default 0)",
    )
    parser.add_argument(
        "--targets-dir",
        default=os.environ.get("BIRDWATCH_PROM_TARGETS"),
        help="folder Prometheus reads file-SD target lists from (default: $BIRDWATCH_PROM_TARGETS; none: no scraping)",
    )
    parser.add_argument(
        "--control-port",
        type=int,
        default=0,
        help="loopback port of the control server (default 0: any free port; -1: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated failures")
    parser.add_argument("--report-every", type=float, default=5.0, help="seconds between status lines (0: none)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


async def run(args: argparse.Namespace) -> int:
    sim = MeshSim(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        service=args.service,
        versions=[v.strip() for v in args.versions.split(",") if v.strip()],
        rps=args.rps,
        error_rates=args.error_rates,
        latencies_ms=args.latencies,
        targets_dir=args.targets_dir,
        control_port=None if args.control_port < 0 else args.control_port,
        seed=args.seed,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await sim.start()
        except TimeoutError:
            print(f"meshsim: error: the API server did not answer (kubeconfig {args.kubeconfig})", file=sys.stderr)
            return 1
        except (OSError, ConfigException) as exc:
            print(f"meshsim: error: {exc}", file=sys.stderr)
            return 1
        where = " ".join(f"{v}={address}" for v, address in sim.addresses().items())
        print(
            f"meshsim: {sim.service} in {sim.namespace}: {where}; control {sim.control_url or '-'}; "
            f"targets {sim.targets_file or '-'}",
            flush=True,
        )
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=args.report_every or None)
            if not stop.is_set():
                _report(sim)
        return 0
    finally:
        await sim.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _report(sim: MeshSim) -> None:
    served = " ".join(f"{v}:{ok}/{errors}" for v, (ok, errors) in sim.served().items())
    print(
        f"route {sim.route.describe()} | served ok/5xx {served} | sent {sim.sent} unrouted {sim.unrouted} "
        f"dropped {sim.dropped} failed {sim.failed}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.error_rates = _version_values(args.error_rate, "--error-rate")
        args.latencies = _version_values(args.latency, "--latency")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not args.kubeconfig:
        parser.error("--kubeconfig is required (or set $KUBECONFIG)")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(run(args))
    except ValueError as exc:
        print(f"meshsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
