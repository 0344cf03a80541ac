"""Whether the canary's pods can take traffic: the Deployments carrying the canary subset's labels (its
``version: <canary_version>`` and whatever else the subset selects on, such as ``app``) are all available.

"Available" is what ``kubectl rollout status`` waits for, read from the Deployment controller's own status: it has
seen the newest spec, every replica runs that spec, no replica of an older ReplicaSet is left (during a surge the
old pods still count as available, and would hide new pods that are not), and all of them are available. When the
answer is no, the text says why in the controller's own words where it has some: the ``Progressing`` condition's
``ProgressDeadlineExceeded`` message, or the ``Available`` condition's.
"""

from __future__ import annotations

from .kube import DEPLOYMENTS, Kube, Obj


def _condition(status: Obj, kind: str) -> Obj:
    for condition in status.get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == kind:
            return condition
    return {}


def _said(condition: Obj) -> str:
    reason, message = condition.get("reason") or "", (condition.get("message") or "").strip()
    return f"{reason}: {message}" if reason and message else reason or message


def deployment_available(deployment: Obj) -> tuple[bool, str]:
    name = deployment["metadata"]["name"]
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    if wanted == 0:
        return False, f"Deployment {name} is scaled to zero"
    if int(status.get("observedGeneration", 0)) < int(deployment["metadata"].get("generation", 0)):
        return False, f"Deployment {name}: its newest spec is not rolled out yet"
    replicas = int(status.get("replicas", 0))
    updated = int(status.get("updatedReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    counts = f"{available}/{wanted} replicas available, {updated}/{wanted} updated"
    progressing = _condition(status, "Progressing")
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        # The controller has given up waiting for this rollout; its message names the ReplicaSet that timed out.
        return False, f"Deployment {name}: {counts}; {_said(progressing)}"
    waiting: list[str] = []
    if updated < wanted or available < wanted:
        waiting.append(counts)
    old = replicas - updated
    if old > 0 and not waiting:
        # Old pods still running beside a complete new set: availableReplicas counts both, so until they are gone
        # it cannot tell whether the new ones are available.
        waiting.append(f"{old} old replica{'s' if old != 1 else ''} pending termination")
    if not waiting:
        return True, f"Deployment {name}: {available}/{wanted} replicas available"
    unavailable = int(status.get("unavailableReplicas", 0))
    if unavailable:
        waiting.append(f"{unavailable} unavailable")
    available_condition = _condition(status, "Available")
    if available_condition.get("status") == "False":
        waiting.append(_said(available_condition))
    return False, f"Deployment {name}: " + ", ".join(waiting)


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
