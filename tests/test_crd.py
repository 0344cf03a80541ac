"""The BirdWatch CRD explains itself: every property of its schema, ``spec`` and ``status`` included, has a
description; a field's description states its default and range as the schema enforces them; ``kubectl explain``
shows them from the real API server; the status birdwatch writes fits the schema; and the printer columns are the
documented ones.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from birdwatch.spec import Phase
from birdwatch.status import Status, StatusWriter
from birdwatch_sandbox.envtest.assets import REPO, Assets
from birdwatch_sandbox.envtest.controlplane import BIRDWATCH_CRD, ControlPlane
from birdwatch_sandbox.kit import eventually

Obj = dict[str, Any]


def crd() -> Obj:
    doc: Obj = yaml.safe_load(BIRDWATCH_CRD.read_text())
    return doc


def version() -> Obj:
    (only,) = crd()["spec"]["versions"]
    found: Obj = only
    return found


def schema() -> Obj:
    found: Obj = version()["schema"]["openAPIV3Schema"]
    return found


def properties(node: Obj, path: str = "") -> Iterator[tuple[str, Obj]]:
    """Every property of the schema, depth first, as (dotted path, its schema); not the top-level ``metadata``,
    where the API server forbids anything but ``type`` (it is the standard ObjectMeta, described by kubectl)."""
    for name, child in (node.get("properties") or {}).items():
        where = f"{path}.{name}" if path else name
        if where == "metadata":
            assert child == {"type": "object"}
            continue
        yield where, child
        yield from properties(child, where)
    items = node.get("items")
    if isinstance(items, dict):
        yield from properties(items, f"{path}[]")


def as_yaml(value: object) -> str:
    """A default as the manifest writes it (false, not Python's False)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def words(text: str) -> str:
    return " ".join(text.split())


def test_every_property_has_a_description() -> None:
    assert schema().get("description"), "the BirdWatch itself"
    found = dict(properties(schema()))
    assert {"spec", "status", "spec.increment", "status.reason", "status.conditions[].reason"} <= set(found)
    missing = [path for path, node in found.items() if not str(node.get("description", "")).strip()]
    assert not missing, f"no description: {missing}"
    for path, node in found.items():
        assert "extension" not in node["description"].lower(), (path, "say what it does, not where it came from")
        items = node.get("items")
        if isinstance(items, dict) and items.get("type") == "object":
            assert items.get("description"), f"{path}[]"


def test_each_description_states_the_default_and_range_the_schema_enforces() -> None:
    spec = schema()["properties"]["spec"]
    required = set(spec["required"])
    for path, node in properties(schema()):
        text = words(node["description"])
        name = path.rsplit(".", 1)[-1]
        if "default" in node:
            assert f"Default {as_yaml(node['default'])}." in text, (path, text)
        if "minimum" in node and "maximum" in node:
            assert f"Range {node['minimum']}-{node['maximum']}" in text, (path, text)
            if node.get("exclusiveMaximum"):
                assert f"Range {node['minimum']}-{node['maximum']}, {node['maximum']} excluded" in text, (path, text)
        elif "minimum" in node:
            assert f">= {node['minimum']}" in text or f"{node['minimum']} or more" in text, (path, text)
        if "enum" in node and path.startswith("spec."):
            assert all(str(v) in text for v in node["enum"]), (path, text)
        if "minLength" in node and "maxLength" in node:
            assert f"{node['minLength']}-{node['maxLength']} characters" in text, (path, text)
        if path.startswith("spec.") and name in required:
            assert text.startswith("Required."), (path, text)


@pytest.fixture(scope="module")
def kubectl(assets: Assets) -> Path:
    found = assets.kubectl or shutil.which("kubectl")
    assert found, "no kubectl: hack/install-control-plane.sh builds one unless KUBEBUILDER_ASSETS lacks it"
    return Path(found)


def explain(kubectl: Path, plane: ControlPlane, field: str) -> str:
    done = subprocess.run(
        [str(kubectl), "--kubeconfig", str(plane.kubeconfig), "explain", field],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout if done.returncode == 0 else ""


async def test_kubectl_explain_shows_the_descriptions(kubectl: Path, control_plane: ControlPlane) -> None:
    spec = schema()["properties"]["spec"]
    status = schema()["properties"]["status"]

    # The API server publishes a CRD's OpenAPI a moment after it is installed.
    async def explained() -> str:
        return explain(kubectl, control_plane, "bw.spec")

    text = words(await eventually(explained, timeout=30, what="kubectl explain bw.spec"))
    assert words(spec["description"]) in text, text
    for name in spec["properties"]:
        assert name in text
    assert "<empty>" not in text
    assert "<no description>" not in text
    increment = words(explain(kubectl, control_plane, "bw.spec.increment"))
    assert "Default 1. Range 1-10." in increment, increment
    text = words(explain(kubectl, control_plane, "bw.status"))
    assert words(status["description"]) in text, text
    assert "reason" in text
    assert "<no description>" not in text
    reason = words(explain(kubectl, control_plane, "bw.status.conditions.reason"))
    assert "BadQuery" in reason, reason


def test_the_status_birdwatch_writes_fits_the_schema() -> None:
    """Every key of the status body birdwatch PATCHes is in the schema (a key missing there would be pruned by the
    API server without a word), and the phases are the same."""
    status = schema()["properties"]["status"]
    writer = StatusWriter(None, namespace="ns", name="aleph")  # type: ignore[arg-type]  # body() makes no call
    body = writer.body(Status(phase=Phase.PROGRESSING, observed_generation=1, reason="TrafficShifted"))
    assert set(body) <= set(status["properties"]), set(body) - set(status["properties"])
    (condition, *_) = body["conditions"]
    assert set(condition) <= set(status["properties"]["conditions"]["items"]["properties"])
    assert status["properties"]["phase"]["enum"] == [p.value for p in Phase]


def test_printer_columns_show_readable_values_and_keep_raw_numbers_for_wide() -> None:
    """A printer column cannot format a number (VALUE printed 0.1629829369640173): the default view shows the
    message, where birdwatch writes values to 6 significant digits; the raw numbers are in -o wide."""
    columns = {c["name"]: c for c in version()["additionalPrinterColumns"]}
    default = [name for name, c in columns.items() if not c.get("priority")]
    assert default == ["Service", "Canary", "Phase", "Weight", "Age", "Message"]
    assert columns["Message"]["jsonPath"] == ".status.message"
    for name in ("Value", "Baseline", "Reason"):
        assert columns[name]["priority"] == 1, name
    for name, column in columns.items():
        assert name == "Age" or column.get("description"), name
    paths = {c["jsonPath"].removeprefix(".status.") for c in columns.values() if c["jsonPath"].startswith(".status.")}
    assert paths <= set(schema()["properties"]["status"]["properties"])
