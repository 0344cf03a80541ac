"""Whether the canary's pods can take traffic: the Deployments carrying the canary subset's labels (its
``version: <canary_version>`` and whatever else the subset selects on, such as ``app``) are all available."""

from __future__ import annotations

from .kube import DEPLOYMENTS, Kube, Obj


def deployment_available(deployment: Obj) -> tuple[bool, str]:
    name = deployment["metadata"]["name"]
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    if wanted == 0:
        return False, f"Deployment {name} is scaled to zero"
    updated = int(status.get("updatedReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    if updated < wanted or available < wanted:
        return False, f"Deployment {name}: {available}/{wanted} replicas available, {updated}/{wanted} updated"
    if int(status.get("observedGeneration", 0)) < int(deployment["metadata"].get("generation", 0)):
        return False, f"Deployment {name}: its newest spec is not rolled out yet"
    return True, f"Deployment {name}: {available}/{wanted} replicas available"


async def canary_available(kube: Kube, *, namespace: str, labels: dict[str, str]) -> tuple[bool, str]:
    """(True, summary) once every Deployment carrying ``labels`` is fully available."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    items, _ = await kube.list(DEPLOYMENTS, namespace, label_selector=selector)
    if not items:
        return False, f"no Deployment labelled {selector} in namespace {namespace}"
    verdicts = [deployment_available(d) for d in items]
    waiting = [why for ok, why in verdicts if not ok]
    if waiting:
        return False, "; ".join(waiting)
    return True, "; ".join(why for _, why in verdicts)
