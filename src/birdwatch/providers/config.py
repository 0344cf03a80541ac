"""The providers file: which metric backends this controller may ask, read once at start-up.

```yaml
providers:
  - name: influx               # what a BirdWatch's spec.provider names (a DNS label)
    type: influxdb             # prometheus, influxdb, graphite, loki, datadog, newrelic, web
    address: http://influxdb.monitoring:8086
    database: istio            # options of the type (see each type's module)
    username: birdwatch
    password_file: /etc/birdwatch/secrets/influx-password
```

Credentials are never written in the file itself, only the paths of files holding them (a mounted Secret), so the
ConfigMap can be read by anyone and the secrets rotate without a restart: they are re-read when they change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

__all__ = ["COMMON_KEYS", "ProviderConfigError", "ProviderSpec", "load_providers_file", "parse_providers"]

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
TYPES = ("prometheus", "influxdb", "graphite", "loki", "datadog", "newrelic", "web")
COMMON_KEYS = frozenset(
    {
        "name",
        "type",
        "address",
        "timeout",
        "ca_file",
        "username",
        "password_file",
        "token_file",
        "headers",
        "header_files",
    }
)


class ProviderConfigError(ValueError):
    """The providers file cannot be used; the message names the entry and the key."""


@dataclass(frozen=True, kw_only=True)
class ProviderSpec:
    """One entry of the providers file. Secrets are paths here, never values."""

    name: str
    type: str
    address: str
    timeout: float = 10.0
    ca_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    header_files: Mapping[str, Path] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)  # the type's own keys, checked by its module

    def option(self, key: str, default: str | None = None) -> str | None:
        value = self.options.get(key, default)
        return None if value is None else str(value)


def load_providers_file(path: Path) -> list[ProviderSpec]:
    """Read and check the file (at start-up, before the event loop runs, so a plain read is fine)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProviderConfigError(f"providers file {path}: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProviderConfigError(f"providers file {path} is not YAML: {exc}") from None
    try:
        return parse_providers(doc)
    except ProviderConfigError as exc:
        raise ProviderConfigError(f"providers file {path}: {exc}") from None


def parse_providers(doc: Any) -> list[ProviderSpec]:
    if doc is None:
        return []
    if not isinstance(doc, dict) or set(doc) - {"providers"}:
        raise ProviderConfigError("must be a mapping with one key, providers: a list of providers")
    entries = doc.get("providers") or []
    if not isinstance(entries, list):
        raise ProviderConfigError("providers must be a list")
    specs: list[ProviderSpec] = []
    for index, entry in enumerate(entries):
        spec = _entry(index, entry)
        if any(s.name == spec.name for s in specs):
            raise ProviderConfigError(f"provider name {spec.name!r} is used twice")
        specs.append(spec)
    return specs


def _entry(index: int, entry: Any) -> ProviderSpec:
    where = f"providers[{index}]"
    if not isinstance(entry, dict):
        raise ProviderConfigError(f"{where} must be a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not DNS_LABEL.match(name):
        raise ProviderConfigError(f"{where}.name must be a DNS label (a-z, 0-9, '-', at most 63), not {name!r}")
    where = f"provider {name!r}"
    kind = entry.get("type")
    if kind not in TYPES:
        raise ProviderConfigError(f"{where}: type must be one of {', '.join(TYPES)}, not {kind!r}")
    address = entry.get("address")
    if not isinstance(address, str) or not address:
        raise ProviderConfigError(f"{where}: address (an http(s) URL) is required")
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderConfigError(f"{where}: address must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # A URL is printed in messages and logs; credentials belong in files.
        raise ProviderConfigError(f"{where}: put credentials in username/password_file, not in the address")
    timeout = entry.get("timeout", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ProviderConfigError(f"{where}: timeout must be a positive number of seconds, not {timeout!r}")
    username = entry.get("username")
    if username is not None and not isinstance(username, str):
        raise ProviderConfigError(f"{where}: username must be a string")
    headers = _string_map(where, "headers", entry.get("headers"))
    header_files = {k: Path(v) for k, v in _string_map(where, "header_files", entry.get("header_files")).items()}
    for key in ("password", "token", "api_key", "secret"):
        if key in entry:
            # The providers file is a ConfigMap, readable by many: secrets belong in a Secret's files.
            raise ProviderConfigError(f"{where}: {key} must come from a file ({key}_file), not the file itself")
    spec = ProviderSpec(
        name=name,
        type=kind,
        address=address.rstrip("/"),
        timeout=float(timeout),
        ca_file=_path(where, entry, "ca_file"),
        username=username,
        password_file=_path(where, entry, "password_file"),
        token_file=_path(where, entry, "token_file"),
        headers=headers,
        header_files=header_files,
        options={k: v for k, v in entry.items() if k not in COMMON_KEYS},
    )
    if spec.password_file is not None and spec.username is None:
        raise ProviderConfigError(f"{where}: password_file needs a username")
    if spec.username is not None and spec.token_file is not None:
        raise ProviderConfigError(f"{where}: use either username/password_file or token_file, not both")
    for path in (spec.ca_file, spec.password_file, spec.token_file, *spec.header_files.values()):
        if path is not None and not path.is_file():
            raise ProviderConfigError(f"{where}: {path} does not exist or is not a file")
    return spec


def _path(where: str, entry: Mapping[str, Any], key: str) -> Path | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ProviderConfigError(f"{where}: {key} must be a file path")
    return Path(value)


def _string_map(where: str, key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ProviderConfigError(f"{where}: {key} must map header names to strings")
    return dict(value)
