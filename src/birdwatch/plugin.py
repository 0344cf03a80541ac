"""``kubectl birdwatch``: see and steer rollouts from a terminal, with the user's own kubeconfig and context.

    kubectl birdwatch get [NAME] [-n NS | -A]      the rollouts as a table
    kubectl birdwatch status NAME [-w]             one rollout in detail; -w follows it to its end
    kubectl birdwatch pause|resume NAME            spec.paused (resume also answers a Frozen rollout)
    kubectl birdwatch promote|abort|retry NAME     a request birdwatch acts on once and acknowledges in status

Every action is a change anyone allowed to ``patch`` birdwatches can make with plain kubectl (README, "Steering a
rollout by hand"); this command makes it, then waits until birdwatch acknowledges it in status.

Exit codes: 0 done; 1 refused by birdwatch, or an API error; 2 bad usage or kubeconfig; 3 no such BirdWatch;
4 forbidden; 5 nobody acknowledged in time (is birdwatch running, and watching this namespace?).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from .errors import ConfigError
from .kube import BIRDWATCHES, Kube, KubeError, Obj
from .updates import REQUEST_ANNOTATION

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_FORBIDDEN, EXIT_NO_ANSWER = 0, 1, 2, 3, 4, 5
TERMINAL = {"Promoted", "RolledBack", "Frozen", "Failed"}
BAR = 20


class Exit(Exception):
    """Ends the command with ``code`` after saying ``message`` on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- reading a rollout ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class View:
    """One BirdWatch as the plugin shows it."""

    namespace: str
    name: str
    phase: str
    weight: int
    value: float | None
    baseline: float | None
    failed: int
    threshold: int
    next_step: float | None  # seconds until the next step or check, while Progressing
    message: str
    generation: int
    observed: int
    service: str
    canary: str

    @classmethod
    def of(cls, obj: Obj, *, now: float) -> View:
        spec, status, meta = obj.get("spec") or {}, obj.get("status") or {}, obj["metadata"]
        phase = str(status.get("phase") or "Pending")
        next_step = None
        stepped = _epoch(status.get("lastStepTime"))
        if phase == "Progressing" and stepped is not None:
            next_step = max(0.0, stepped + float(spec.get("interval", 5)) - now)
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta["name"]),
            phase=phase,
            weight=int(status.get("canaryWeight") or 0),
            value=_float(status.get("lastValue")),
            baseline=_float(status.get("baseline")),
            failed=int(status.get("failedChecks") or 0),
            threshold=int(spec.get("failure_threshold", 1)),
            next_step=next_step,
            message=str(status.get("message") or ""),
            generation=int(meta.get("generation") or 0),
            observed=int(status.get("observedGeneration") or 0),
            service=str(spec.get("service", "")),
            canary=str(spec.get("canary_version", "")),
        )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _epoch(text: Any) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def number(value: float | None) -> str:
    """Readable: 0.1629829369640173 -> 0.163, 12345.678 -> 12346, None -> -."""
    if value is None:
        return "-"
    if value == 0 or 0.001 <= abs(value) < 1000:
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.4g}"
    return f"{value:.3g}"


def bar(weight: int) -> str:
    filled = round(weight / 100 * BAR)
    return "[" + "#" * filled + "." * (BAR - filled) + f"] {weight:3d}%"


def table(views: Sequence[View], *, all_namespaces: bool) -> str:
    head = ["NAME", "PHASE", "WEIGHT", "VALUE / BASELINE", "FAILED", "NEXT STEP"]
    if all_namespaces:
        head.insert(0, "NAMESPACE")
    rows = [head]
    for v in views:
        row = [
            v.name,
            v.phase,
            f"{v.weight}%",
            f"{number(v.value)} / {number(v.baseline)}",
            f"{v.failed}/{v.threshold}",
            f"in {v.next_step:.0f}s" if v.next_step is not None else "-",
        ]
        if all_namespaces:
            row.insert(0, v.namespace)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def detail(v: View) -> str:
    lines = [
        f"{v.namespace}/{v.name}: {v.service} canary {v.canary}",
        f"  phase     {v.phase}" + ("" if v.observed == v.generation else " (the newest spec is not seen yet)"),
        f"  weight    {bar(v.weight)}",
        f"  value     {number(v.value)} (baseline {number(v.baseline)})",
        f"  failed    {v.failed}/{v.threshold} checks",
    ]
    if v.next_step is not None:
        lines.append(f"  next      in {v.next_step:.0f}s")
    if v.message:
        lines.append(f"  message   {v.message}")
    return "\n".join(lines)


def line(v: View) -> str:
    """The one line ``status -w`` redraws (the demo's)."""
    return f"{v.name}  {v.canary}  {bar(v.weight)}  value {number(v.value)} / baseline {number(v.baseline)}  {v.phase}"


# --- the commands -----------------------------------------------------------------------------------------------


class Plugin:
    def __init__(self, kube: Kube, *, namespace: str, out: TextIO, timeout: float) -> None:
        self._kube = kube
        self.namespace = namespace
        self._out = out
        self._timeout = timeout

    async def get(self, name: str | None, *, all_namespaces: bool) -> int:
        now = time.time()
        if name:
            views = [View.of(await self._read(name), now=now)]
        else:
            items, _ = await self._kube.list(BIRDWATCHES, None if all_namespaces else self.namespace)
            views = sorted((View.of(i, now=now) for i in items), key=lambda v: (v.namespace, v.name))
        if not views:
            where = "any namespace" if all_namespaces else f"namespace {self.namespace}"
            print(f"No BirdWatches in {where}.", file=self._out)
            return EXIT_OK
        print(table(views, all_namespaces=all_namespaces), file=self._out)
        return EXIT_OK

    async def status(self, name: str, *, watch: bool, interval: float = 0.5) -> int:
        view = View.of(await self._read(name), now=time.time())
        if not watch:
            print(detail(view), file=self._out)
            return EXIT_OK
        live = self._out.isatty()
        shown = ""
        while True:
            text = line(view)
            if text != shown:
                if live:
                    self._out.write("\r\x1b[2K" + text)
                else:
                    self._out.write(text + "\n")
                self._out.flush()
                shown = text
            if view.phase in TERMINAL and view.observed == view.generation:
                if live:
                    self._out.write("\n")
                print(f"   {view.message}", file=self._out)
                return EXIT_OK
            await asyncio.sleep(interval)
            view = View.of(await self._read(name), now=time.time())

    async def pause(self, name: str) -> int:
        obj = await self._read(name)
        if (obj.get("spec") or {}).get("paused"):
            print(f"{name} is paused already", file=self._out)
            return EXIT_OK
        print(f"asking to pause {self.namespace}/{name} (spec.paused: true)", file=self._out)
        patched = await self._kube.merge_patch(BIRDWATCHES, self.namespace, name, {"spec": {"paused": True}})
        view = await self._until(
            name, int(patched["metadata"]["generation"]), lambda v: v.phase in {"Paused", *TERMINAL}
        )
        if view.phase != "Paused":
            raise Exit(EXIT_REFUSED, f"not paused: the rollout is {view.phase}: {view.message}")
        print(f"paused at {view.weight}%", file=self._out)
        return EXIT_OK

    async def resume(self, name: str) -> int:
        obj = await self._read(name)
        if (obj.get("spec") or {}).get("paused"):
            print(f"asking to resume {self.namespace}/{name} (spec.paused: false)", file=self._out)
            patched = await self._kube.merge_patch(BIRDWATCHES, self.namespace, name, {"spec": {"paused": False}})
            view = await self._until(name, int(patched["metadata"]["generation"]), lambda v: v.phase != "Paused")
            print(f"resumed: {view.phase} at {view.weight}%", file=self._out)
            return EXIT_OK
        return await self.request(name, "resume")

    async def request(self, name: str, action: str) -> int:
        """A one-shot request: the annotation's value is new each time (action/time), so it is acted on once."""
        await self._read(name)
        value = f"{action}/{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"
        print(f"asking to {action} {self.namespace}/{name} ({REQUEST_ANNOTATION}={value})", file=self._out)
        patch = {"metadata": {"annotations": {REQUEST_ANNOTATION: value}}}
        await self._kube.merge_patch(BIRDWATCHES, self.namespace, name, patch)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            ack = ((await self._read(name)).get("status") or {}).get("request") or {}
            if ack.get("id") == value:
                if ack.get("result") == "Done":
                    print(f"done: {ack.get('message', '')}", file=self._out)
                    return EXIT_OK
                raise Exit(EXIT_REFUSED, f"refused: {ack.get('message', '')}")
            await asyncio.sleep(0.2)
        raise self._no_answer()

    async def _until(self, name: str, generation: int, done: Any) -> View:
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            view = View.of(await self._read(name), now=time.time())
            if view.observed >= generation and done(view):
                return view
            await asyncio.sleep(0.2)
        raise self._no_answer()

    def _no_answer(self) -> Exit:
        return Exit(
            EXIT_NO_ANSWER,
            f"no answer from birdwatch within {self._timeout:g}s: is it running, and watching namespace "
            f"{self.namespace}? (kubectl -n birdwatch-system get pods,lease)",
        )

    async def _read(self, name: str) -> Obj:
        return await self._kube.get(BIRDWATCHES, self.namespace, name)


# --- the command line -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # Given before or after the command, as with kubectl; SUPPRESS keeps a later default from hiding an earlier value.
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file (default: as kubectl)")
    common.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context")
    common.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="namespace (default: the context's)")
    common.add_argument(
        "-A", "--all-namespaces", action="store_true", default=argparse.SUPPRESS, help="every namespace"
    )
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for birdwatch's answer (default 30)"
    )
    parser = argparse.ArgumentParser(
        prog="kubectl birdwatch",
        description="See and steer birdwatch canary rollouts.",
        parents=[common],
        epilog="Exit codes: 0 done, 1 refused or API error, 2 usage or kubeconfig, 3 not found, 4 forbidden, "
        "5 no answer from birdwatch.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    get = commands.add_parser("get", parents=[common], help="the rollouts as a table")
    get.add_argument("name", nargs="?")
    status = commands.add_parser("status", parents=[common], help="one rollout in detail")
    status.add_argument("name")
    status.add_argument("-w", "--watch", action="store_true", help="follow it until it ends")
    for action, text in (
        ("pause", "hold the weight: no steps or checks (spec.paused: true)"),
        ("resume", "go on after a pause or from Frozen, same baseline, same weight"),
        ("promote", "finish now: promote the canary"),
        ("abort", "roll back now, whatever if_unhealthy says"),
        ("retry", "start over after RolledBack, Frozen or Failed, with a new baseline"),
    ):
        commands.add_parser(action, parents=[common], help=text).add_argument("name")
    return parser


def context_namespace(kubeconfig: str | None, context: str | None, env: dict[str, str]) -> str:
    """The namespace of the kubeconfig's context, as kubectl reads it (first file that sets it wins)."""
    if kubeconfig:
        paths = [kubeconfig]
    elif env.get("KUBECONFIG", "").strip():
        paths = [p for p in env["KUBECONFIG"].split(os.pathsep) if p.strip()]
    else:
        paths = [str(Path(env.get("HOME") or Path.home()) / ".kube" / "config")]
    docs = []
    for path in paths:
        try:
            doc = yaml.safe_load(Path(path).expanduser().read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(doc, dict):
            docs.append(doc)
    name = context or next((str(d["current-context"]) for d in docs if d.get("current-context")), None)
    for doc in docs:
        for entry in doc.get("contexts") or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                return str((entry.get("context") or {}).get("namespace") or "default")
    return "default"


async def run(argv: Sequence[str], *, out: TextIO, env: dict[str, str]) -> int:
    args = build_parser().parse_args(list(argv))
    kubeconfig, context = getattr(args, "kubeconfig", None), getattr(args, "context", None)
    namespace = getattr(args, "namespace", None) or context_namespace(kubeconfig, context, env)
    kube = await Kube.connect(kubeconfig=kubeconfig, context=context, env=env)
    plugin = Plugin(kube, namespace=namespace, out=out, timeout=getattr(args, "timeout", 30.0))
    try:
        if args.command == "get":
            return await plugin.get(args.name, all_namespaces=getattr(args, "all_namespaces", False))
        if args.command == "status":
            return await plugin.status(args.name, watch=args.watch)
        if args.command == "pause":
            return await plugin.pause(args.name)
        if args.command == "resume":
            return await plugin.resume(args.name)
        return await plugin.request(args.name, args.command)
    except KubeError as exc:
        if exc.status == 404:
            raise Exit(
                EXIT_NOT_FOUND, f"BirdWatch {getattr(args, 'name', '')} not found in namespace {namespace}"
            ) from None
        if exc.status == 403:
            raise Exit(EXIT_FORBIDDEN, f"forbidden: {exc.message}") from None
        raise Exit(EXIT_REFUSED, str(exc)) from None
    finally:
        await kube.close()


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = asyncio.run(run(sys.argv[1:] if argv is None else argv, out=sys.stdout, env=dict(os.environ)))
    except Exit as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
