"""birdwatch's settings: flags that mirror environment variables, checked before anything starts."""

from __future__ import annotations

import argparse
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .notifiers.settings import NotifierSettings, load_file, slack_from_env
from .prometheus import PrometheusConfig
from .providers.config import ProviderConfigError, ProviderSpec, load_providers_file
from .providers.registry import check_specs

__all__ = ["ConfigError", "LeaderSettings", "Settings", "add_run_arguments", "settings_from"]

DEFAULT_PROMETHEUS = "http://prometheus.istio-system:9090"  # Istio's Prometheus addon, as the prototype used


@dataclass(frozen=True, kw_only=True)
class LeaderSettings:
    enabled: bool = False
    namespace: str = "birdwatch-system"
    name: str = "birdwatch"
    identity: str = ""
    label_selector: str = ""  # the shard this Lease elects for, written on the Lease ("" for all BirdWatches)
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass(frozen=True, kw_only=True)
class Settings:
    kubeconfig: str | None
    context: str | None
    namespaces: tuple[str, ...]
    prometheus: PrometheusConfig
    slack_token: str | None = field(repr=False)
    slack_channel: str
    slack_api_url: str | None
    log_format: str
    log_level: str
    health_address: str | None  # host:port, or None for no health/metrics server
    leader: LeaderSettings
    label_selector: str | None = None  # only BirdWatches matching it (a shard); None: all of them
    shutdown_grace: float
    watch_read_timeout: float
    notifiers: tuple[NotifierSettings, ...] = ()  # from --notifiers-file, and `slack` from today's SLACK_* settings
    providers: tuple[ProviderSpec, ...] = ()  # from --providers-file; the default "prometheus" is not among them


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def add_run_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    def e(name: str, default: str | None = None) -> str | None:
        return _env(env, name) or default

    k = parser.add_argument_group("Kubernetes")
    k.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file to use; default: $KUBECONFIG (a colon-separated list of files, merged as kubectl "
        "merges them), else in-cluster credentials, else ~/.kube/config",
    )
    k.add_argument("--context", default=e("BIRDWATCH_CONTEXT"), help="kubeconfig context [$BIRDWATCH_CONTEXT]")
    k.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch only this namespace; repeat for several [$BIRDWATCH_NAMESPACES, comma-separated]; "
        "default: all namespaces",
    )
    k.add_argument(
        "--label-selector",
        default=e("BIRDWATCH_LABEL_SELECTOR"),
        metavar="SELECTOR",
        help="carry out only the BirdWatches whose labels match this selector, in kubectl's syntax, so that "
        "several birdwatch Deployments share the BirdWatches as shards, e.g. birdwatch.otomato.link/shard=shard1, "
        "and for the main instance !birdwatch.otomato.link/shard; with --leader-elect, each shard needs its own "
        "--leader-elect-name [$BIRDWATCH_LABEL_SELECTOR] (default: every BirdWatch)",
    )
    p = parser.add_argument_group("Prometheus")
    p.add_argument(
        "--prometheus-url",
        default=e("PROMETHEUS_URL", DEFAULT_PROMETHEUS),
        metavar="URL",
        help=f"Prometheus to query [$PROMETHEUS_URL] (default {DEFAULT_PROMETHEUS})",
    )
    p.add_argument(
        "--prometheus-token-file",
        default=e("PROMETHEUS_TOKEN_FILE"),
        metavar="PATH",
        help="bearer token file, re-read when it changes [$PROMETHEUS_TOKEN_FILE]",
    )
    p.add_argument(
        "--prometheus-username",
        default=e("PROMETHEUS_USERNAME"),
        metavar="USER",
        help="basic-auth user [$PROMETHEUS_USERNAME]; the password comes from $PROMETHEUS_PASSWORD",
    )
    p.add_argument(
        "--prometheus-ca-file",
        default=e("PROMETHEUS_CA_FILE"),
        metavar="PATH",
        help="CA bundle for an https Prometheus [$PROMETHEUS_CA_FILE]",
    )
    p.add_argument(
        "--prometheus-timeout",
        type=float,
        default=float(e("PROMETHEUS_TIMEOUT") or 10),
        metavar="S",
        help="bound on each query, seconds [$PROMETHEUS_TIMEOUT] (default 10)",
    )
    mp = parser.add_argument_group("Metric providers (a BirdWatch's spec.provider; default: the Prometheus above)")
    mp.add_argument(
        "--providers-file",
        default=e("BIRDWATCH_PROVIDERS_FILE"),
        metavar="PATH",
        help="YAML file naming more metric providers (prometheus, influxdb, graphite, loki, datadog, newrelic, "
        "web), with credentials read from files [$BIRDWATCH_PROVIDERS_FILE]",
    )
    n = parser.add_argument_group("Notifications")
    n.add_argument(
        "--notifiers-file",
        default=e("BIRDWATCH_NOTIFIERS_FILE"),
        metavar="PATH",
        help="YAML file of notifiers (slack, teams, discord, googlechat, mattermost, rocketchat, webhook, email): "
        "where each posts, credentials read from files, the moments and namespaces it wants "
        "[$BIRDWATCH_NOTIFIERS_FILE]",
    )
    s = parser.add_argument_group("Slack (token from $SLACK_API_TOKEN; no token, no Slack; the notifier named slack)")
    s.add_argument(
        "--slack-channel",
        default=e("SLACK_CHANNEL", "deployment"),
        metavar="CHANNEL",
        help="channel for notifications [$SLACK_CHANNEL] (default deployment)",
    )
    s.add_argument(
        "--slack-api-url",
        default=e("SLACK_API_URL"),
        metavar="URL",
        help="Slack Web API base URL, for Slack-compatible servers [$SLACK_API_URL]",
    )
    o = parser.add_argument_group("Operation")
    o.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=e("BIRDWATCH_LOG_FORMAT", "json"),
        help="json: one object per line (default); console: for people [$BIRDWATCH_LOG_FORMAT]",
    )
    o.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=e("BIRDWATCH_LOG_LEVEL", "info"),
        help="[$BIRDWATCH_LOG_LEVEL] (default info)",
    )
    o.add_argument(
        "--health-address",
        default=e("BIRDWATCH_HEALTH_ADDRESS", "0.0.0.0:8080"),
        metavar="HOST:PORT",
        help="serve /healthz, /readyz and /metrics here; 'off' for none [$BIRDWATCH_HEALTH_ADDRESS] "
        "(default 0.0.0.0:8080)",
    )
    o.add_argument(
        "--shutdown-grace",
        type=float,
        default=8.0,
        metavar="S",
        help="on SIGTERM, how long canaries get to reach a safe point (default 8)",
    )
    o.add_argument(
        "--watch-read-timeout",
        type=float,
        default=90.0,
        metavar="S",
        help="a watch silent this long is re-opened (default 90)",
    )
    le = parser.add_argument_group("Leader election (for several replicas)")
    le.add_argument(
        "--leader-elect",
        action="store_true",
        default=(e("BIRDWATCH_LEADER_ELECT", "false") or "").lower() in ("1", "true", "yes"),
        help="act only while holding a coordination.k8s.io Lease [$BIRDWATCH_LEADER_ELECT]",
    )
    le.add_argument(
        "--leader-elect-namespace",
        default=e("POD_NAMESPACE", "birdwatch-system"),
        metavar="NS",
        help="namespace of the Lease [$POD_NAMESPACE] (default birdwatch-system)",
    )
    le.add_argument(
        "--leader-elect-name",
        default=e("BIRDWATCH_LEADER_ELECT_NAME"),
        metavar="NAME",
        help="Lease name [$BIRDWATCH_LEADER_ELECT_NAME] (default birdwatch; required with --label-selector: one "
        "Lease per shard)",
    )
    le.add_argument(
        "--leader-elect-identity",
        default=e("POD_NAME"),
        metavar="ID",
        help="this replica's identity: the Lease's holder, and the reportingInstance of its Events (which shard "
        "posted them) [$POD_NAME] (default hostname and pid)",
    )
    le.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        metavar="S",
        help="how long a Lease holds without renewal (default 15)",
    )
    le.add_argument(
        "--renew-deadline",
        type=float,
        default=10.0,
        metavar="S",
        help="a leader that could not renew for this long steps down (default 10)",
    )
    le.add_argument(
        "--retry-period", type=float, default=2.0, metavar="S", help="between tries to acquire or renew (default 2)"
    )


def settings_from(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Settings:
    """Check the parsed arguments; raise ConfigError with one clear sentence when something is wrong."""
    url = str(args.prometheus_url).rstrip("/")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"PROMETHEUS_URL must be an http:// or https:// URL with a host, not {_redact(url)!r}")
    kubeconfig_list = _env(env, "KUBECONFIG")
    if not args.kubeconfig and kubeconfig_list:
        _check_kubeconfig_list(kubeconfig_list)
    for flag, path in (
        ("--kubeconfig", args.kubeconfig),
        ("--prometheus-token-file", args.prometheus_token_file),
        ("--prometheus-ca-file", args.prometheus_ca_file),
    ):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{flag} {path}: file does not exist or cannot be read")
    if args.prometheus_timeout <= 0:
        raise ConfigError("--prometheus-timeout must be positive")
    namespaces: Sequence[str] = args.namespaces or [
        n.strip() for n in (_env(env, "BIRDWATCH_NAMESPACES") or "").split(",") if n.strip()
    ]
    health = None if str(args.health_address).lower() in ("", "off", "none") else str(args.health_address)
    if health is not None and (":" not in health or not health.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"--health-address must be HOST:PORT or 'off', not {health!r}")
    if args.leader_elect and not args.renew_deadline < args.lease_duration:
        raise ConfigError("--renew-deadline must be shorter than --lease-duration")
    label_selector = str(args.label_selector).strip() if args.label_selector else None
    if args.leader_elect and label_selector and not args.leader_elect_name:
        # A default derived from the selector would be unreadable in `kubectl get lease`, and would move the main
        # instance off the Lease it had before sharding: the operator names each shard's Lease.
        raise ConfigError(
            f"--label-selector {label_selector} with --leader-elect needs --leader-elect-name "
            "($BIRDWATCH_LEADER_ELECT_NAME): each shard elects its leader on a Lease of its own, e.g. "
            "birdwatch-shard1 (two shards on one Lease would take turns instead of working side by side)"
        )
    password = _env(env, "PROMETHEUS_PASSWORD")
    if password and not args.prometheus_username:
        raise ConfigError("PROMETHEUS_PASSWORD is set but --prometheus-username / $PROMETHEUS_USERNAME is not")
    try:
        prometheus = PrometheusConfig(
            url=url,
            bearer_token_file=Path(args.prometheus_token_file) if args.prometheus_token_file else None,
            username=args.prometheus_username,
            password=password,
            ca_file=Path(args.prometheus_ca_file) if args.prometheus_ca_file else None,
            timeout=args.prometheus_timeout,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    providers: tuple[ProviderSpec, ...] = ()
    if args.providers_file:
        try:
            providers = tuple(load_providers_file(Path(args.providers_file)))
        except ProviderConfigError as exc:
            raise ConfigError(str(exc)) from None
        try:
            check_specs(providers)
        except ProviderConfigError as exc:
            raise ConfigError(f"providers file {args.providers_file}: {exc}") from None
    notifiers = load_file(args.notifiers_file) if args.notifiers_file else ()
    legacy = slack_from_env(token=_env(env, "SLACK_API_TOKEN"), channel=args.slack_channel, api_url=args.slack_api_url)
    if legacy is not None:
        if any(n.name == legacy.name for n in notifiers):
            raise ConfigError(
                "$SLACK_API_TOKEN is set and the notifiers file names a notifier slack too: keep one of them"
            )
        notifiers = (legacy, *notifiers)
    return Settings(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespaces=tuple(dict.fromkeys(namespaces)),
        prometheus=prometheus,
        slack_token=_env(env, "SLACK_API_TOKEN"),
        slack_channel=args.slack_channel,
        slack_api_url=args.slack_api_url,
        log_format=args.log_format,
        log_level=args.log_level,
        health_address=health,
        label_selector=label_selector,
        leader=LeaderSettings(
            enabled=args.leader_elect,
            namespace=args.leader_elect_namespace,
            name=args.leader_elect_name or "birdwatch",
            label_selector=label_selector or "",
            identity=args.leader_elect_identity or "",
            lease_duration=args.lease_duration,
            renew_deadline=args.renew_deadline,
            retry_period=args.retry_period,
        ),
        shutdown_grace=args.shutdown_grace,
        watch_read_timeout=args.watch_read_timeout,
        notifiers=notifiers,
        providers=providers,
    )


def _check_kubeconfig_list(value: str) -> None:
    """$KUBECONFIG as kubectl reads it: files that do not exist are skipped, but one must exist, and every one
    that exists must be readable. (What is in them is checked when the client loads them.)"""
    paths = [p for p in value.split(os.pathsep) if p.strip()]
    existing = [p for p in paths if os.path.exists(os.path.expanduser(p))]
    if not existing:
        raise ConfigError(f"$KUBECONFIG {value}: no such file")
    for path in existing:
        if not os.access(os.path.expanduser(path), os.R_OK):
            raise ConfigError(f"$KUBECONFIG {value}: {path} cannot be read")


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
