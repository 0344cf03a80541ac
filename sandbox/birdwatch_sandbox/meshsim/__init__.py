"""meshsim: a small stand-in for Envoy and istiod, for birdwatch's demo and tests (not part of birdwatch itself).

It serves each version of one service from a loopback HTTP server that fails at a chosen rate and exports Istio's
standard request metrics for Prometheus; it sends load to the service and splits it between the versions by the
current VirtualService weights and DestinationRule subsets, read from the API server with a watch, as Envoy would be
configured by istiod. Run it with ``birdwatch-meshsim --help``, or from Python::

    async with MeshSim(kubeconfig=..., namespace="demo", service="aleph", versions=["v03", "v04"],
                       targets_dir=prometheus_targets) as sim:
        await sim.wait_for_weights({"v03": 100})
        sim.set_error_rate("v04", 0.2)
        print(sim.weights(), sim.served())

Modules: ``routing`` (VirtualService + DestinationRule -> weights, pure), ``workload`` (one version's server and
metrics), ``watch`` (LIST+WATCH of the two objects), ``sim`` (``MeshSim``: all of it plus the load), ``__main__``
(the command line).
"""

from .routing import Route, WeightedPicker, resolve
from .sim import MeshSim
from .workload import Workload

__all__ = ["MeshSim", "Route", "WeightedPicker", "Workload", "resolve"]
