"""birdwatch: releases canaries safely on an Istio service mesh, step by step, watching a Prometheus metric."""

__version__ = "0.1.0"
