"""The controller process: builds the shared ports, runs the watch loops (while leading), serves health and
metrics, and shuts down in order on SIGTERM: intake first, then canaries at a safe point, then Events and Slack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from .canary import Canary, Ports
from .config import Settings
from .controller import Watcher, WatchSettings
from .endings import EndingAudit, about_an_ending
from .errors import ConfigError
from .events import EventRecorder
from .kube import BIRDWATCHES, DESTINATIONRULES, VIRTUALSERVICES, Kube, KubeError
from .metrics import Metrics
from .notifiers.hub import build as build_notifiers
from .notify import Moment, Notice, Notifier
from .prometheus import PrometheusClient
from .providers.base import Provider
from .providers.registry import DEFAULT, Providers, build_providers
from .registry import CanaryFactory, Registry
from .server import HealthServer
from .spec import Phase
from .updates import Updates

log = structlog.get_logger(__name__)


class App:
    """One birdwatch. ``run()`` until ``stop()`` (or SIGTERM/SIGINT when ``handle_signals``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self.kube: Kube | None = None
        self.registry: Registry | None = None
        self.watchers: list[Watcher] = []
        self.health: HealthServer | None = None
        self._provider_ok: dict[str, tuple[bool, str]] = {}
        self._leading = not settings.leader.enabled
        self._watch_tasks: list[asyncio.Task[None]] = []
        self._prometheus_task: asyncio.Task[None] | None = None
        # Who this replica is: the Lease's holder, and every Event's reportingInstance (which shard wrote it).
        self.identity = settings.leader.identity or f"{socket.gethostname()}-{os.getpid()}"

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # --- readiness -------------------------------------------------------------------------------------------

    def _watch_established(self) -> tuple[bool, str]:
        if not self._leading:
            return True, "standby (not leading)"
        if self.watchers and all(w.established.is_set() for w in self.watchers):
            return True, "watching birdwatches"
        return False, "watch not established yet"

    def _provider_ready(self, name: str) -> Callable[[], tuple[bool, str]]:
        return lambda: self._provider_ok.get(name, (False, "not checked yet"))

    @staticmethod
    def _check_name(name: str) -> str:
        # The default keeps the line /readyz always had; the others are told apart from birdwatch's own checks.
        return name if name == DEFAULT else f"provider/{name}"

    def _loops_alive(self) -> tuple[bool, str]:
        # Only the current term's loops: a standby has none, and is alive.
        dead = [t.get_name() for t in self._watch_tasks if t.done()]
        return (not dead, "watch loops running" if not dead else f"stopped: {', '.join(dead)}")

    # --- the process -----------------------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        self.kube = kube = await Kube.connect(kubeconfig=settings.kubeconfig, context=settings.context)
        prometheus = PrometheusClient(settings.prometheus, on_error=lambda _: self.metrics.prometheus_errors.inc())
        providers = build_providers(settings.providers, default=prometheus, observe=self.metrics.provider_query)
        notifier = build_notifiers(settings.notifiers, kube=kube, on_result=self.metrics.notification)
        events = EventRecorder(
            kube,
            instance=self.identity,
            on_drop=self.metrics.events_dropped.inc,
            on_post=self.metrics.events_posted.inc,
        )
        factory = self._canary_factory(kube, providers, events, notifier)
        ports_ready = False
        try:
            await self._check_label_selector(kube)
            await notifier.start()
            await events.start()
            ports_ready = True
            if settings.health_address:
                host, port = settings.health_address.rsplit(":", 1)
                self.health = HealthServer(
                    host=host,
                    port=int(port),
                    metrics=self.metrics,
                    live={"loops": self._loops_alive},
                    ready={
                        "watch": self._watch_established,
                        **{self._check_name(n): self._provider_ready(n) for n in providers.names()},
                    },
                )
                await self.health.start()
                log.info("serving /healthz, /readyz and /metrics", address=f"{host}:{self.health.port}")
            self._prometheus_task = asyncio.create_task(
                self._monitor_providers(providers, notifier), name="provider-monitor"
            )
            await self._lead(lambda: self._work(kube, factory, events))
        finally:
            log.info("shutting down")
            if self._prometheus_task is not None:
                self._prometheus_task.cancel()
                await asyncio.gather(self._prometheus_task, return_exceptions=True)
            if ports_ready:
                await events.close(timeout=2.0)
                await notifier.close(timeout=2.0)
            await providers.close()
            if self.health is not None:
                await self.health.close()
            await kube.close()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            log.info("stopped")

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal received; stopping", signal=sig.name)
        self.stop()

    async def _lead(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` until stopped (leader election wraps this when enabled)."""
        if not self.settings.leader.enabled:
            await work()
            return
        from .leader import LeaderElector

        assert self.kube is not None
        elector = LeaderElector(
            self.kube,
            self.settings.leader,
            identity=self.identity,
            metrics=self.metrics,
            healthy=lambda: self._loops_alive()[0],
        )

        def leading(on: bool) -> None:
            self._leading = on

        await elector.run(work, stop=self._stop, on_change=leading)

    async def _work(self, kube: Kube, factory: CanaryFactory, events: EventRecorder) -> None:
        """One term of work (the whole run without leader election): watch and carry out canaries until stopped,
        or until leadership is lost (then this is cancelled). A crashed watch loop ends the term with an error."""
        registry = Registry(
            factory, grace=self._grace(), on_forget=self.metrics.forget, label_selector=self.settings.label_selector
        )
        self.registry = registry
        settings = WatchSettings(read_timeout=self.settings.watch_read_timeout)
        scopes = self.settings.namespaces or (None,)
        # A shard lists and watches only its own BirdWatches: the others never reach the registry, so neither the
        # canaries nor the ending audit below (which asks the registry) ever act for them.
        selector = self.settings.label_selector
        self.watchers = [
            Watcher(kube, registry, namespace=ns, settings=settings, label_selector=selector) for ns in scopes
        ]
        self._watch_tasks = [
            asyncio.create_task(w.run(), name=f"watch {ns or '*'}") for w, ns in zip(self.watchers, scopes, strict=True)
        ]
        # Ended rollouts stay watched: their VirtualService and DestinationRule must keep showing the ending.
        audit = EndingAudit(kube, registry, events)
        for resource in (VIRTUALSERVICES, DESTINATIONRULES):
            for ns in scopes:
                wanted = about_an_ending if resource is VIRTUALSERVICES else None
                watcher = Watcher(kube, audit, namespace=ns, settings=settings, resource=resource, wanted=wanted)
                self._watch_tasks.append(
                    asyncio.create_task(watcher.run(), name=f"audit {resource.plural} {ns or '*'}")
                )
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stop, *self._watch_tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and not task.cancelled() and task.exception() is not None:
                    raise RuntimeError(f"{task.get_name()} crashed") from task.exception()
        finally:
            stop.cancel()
            for task in self._watch_tasks:
                task.cancel()
            await asyncio.gather(*self._watch_tasks, return_exceptions=True)
            self._watch_tasks = []
            await audit.close()
            await registry.close()
            self.metrics.canaries.set(0)

    async def _check_label_selector(self, kube: Kube) -> None:
        """A selector the API server cannot parse is bad configuration: found by one LIST at start (the server's
        parse is the one that counts) and said in one line, rather than as a watch failing forever."""
        selector = self.settings.label_selector
        if not selector:
            return
        try:
            await kube.list(BIRDWATCHES, (self.settings.namespaces or (None,))[0], label_selector=selector, page_size=1)
        except KubeError as exc:
            if exc.status == 400:
                raise ConfigError(f"--label-selector {selector!r}: the API server refused it: {exc.message}") from None
            # RBAC, a missing CRD, an unreachable server: the watch loop reports those and keeps trying.
        log.info("carrying out only the BirdWatches matching the label selector", label_selector=selector)

    def _grace(self) -> float:
        """How long canaries get to reach a safe point when stopping. A leader that steps down must be done before
        a standby may take the expired Lease, so there the grace fits in what the Lease leaves."""
        leader = self.settings.leader
        if not leader.enabled:
            return self.settings.shutdown_grace
        return max(0.5, min(self.settings.shutdown_grace, leader.lease_duration - leader.renew_deadline - 1.0))

    def _canary_factory(
        self, kube: Kube, providers: Providers, events: EventRecorder, notifier: Notifier
    ) -> CanaryFactory:
        ports = Ports(
            kube=kube,
            providers=providers,
            events=events,
            notifier=notifier,
            metrics=self.metrics,
            owners=lambda ns, name: self.registry.owner(ns, name) if self.registry else None,
        )

        async def carry_out(obj: dict[str, Any], stop: asyncio.Event, updates: Updates) -> Phase | None:
            self.metrics.canaries.inc()
            try:
                canary = Canary(obj, ports, stop=stop, updates=updates)
                del obj  # the rollout's life long, this frame would keep the first object seen (stale at once)
                return await canary.run()
            finally:
                self.metrics.canaries.dec()

        return carry_out

    async def _monitor_providers(self, providers: Providers, notifier: Notifier) -> None:
        """Readiness follows the metric providers: checked at start (the log says which answer; one that does not is
        said loudly) and every 15 s after. A provider that is down fails only the BirdWatches that name it."""
        first = True
        while not self._stop.is_set():
            answers = await providers.ready()
            for provider in providers:
                was = self._provider_ok.get(provider.name, (False, ""))[0]
                self._provider_ok[provider.name] = ok, why = answers[provider.name]
                if first or ok != was:
                    self._say_provider(provider, ok=ok, why=why, notifier=notifier)
            if first:
                log.info(
                    "metric providers checked",
                    answering=[n for n, (ok, _) in answers.items() if ok],
                    not_answering=[n for n, (ok, _) in answers.items() if not ok],
                )
            first = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 15.0)

    def _say_provider(self, provider: Provider, *, ok: bool, why: str, notifier: Notifier) -> None:
        default = provider.name == DEFAULT
        where = self.settings.prometheus.url if default else provider.address
        if ok:
            log.info("prometheus ready" if default else "metric provider ready", provider=provider.name, url=where)
            return
        event = (
            "prometheus not reachable; canaries count failed checks until it is"
            if default
            else "metric provider not reachable; canaries using it count failed checks until it is"
        )
        log.error(event, provider=provider.name, url=where, detail=why)
        notifier.notify(
            Notice(
                moment=Moment.FAILED,
                namespace="-",
                name="birdwatch",
                service="-",
                canary_version="-",
                weight=0,
                message=f"{provider.kind} at {where} (provider {provider.name}) is not reachable: {why}",
            )
        )
