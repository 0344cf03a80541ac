"""birdwatch's sandbox: a cluster in miniature that the tests, the demo, the benchmark and the soak share.

- ``envtest``: real etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok's fake nodes on loopback
  ports, a real Prometheus, the real metric backends (VictoriaMetrics, InfluxDB, Graphite); ``birdwatch-sandbox up``
  (``make sandbox-up``) runs them in the background for people.
- ``meshsim``: a mesh simulator that routes requests by the live VirtualService weights and exports Istio's metrics.
- ``faultproxy``: a TLS proxy in front of the API server (or any HTTP server) that fails, hangs and cuts on purpose.
- ``kit``: the objects and waits the tests and tools build on (Deployments, BirdWatches, watches that relist).
"""
