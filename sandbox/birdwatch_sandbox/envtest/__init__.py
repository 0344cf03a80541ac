"""A local Kubernetes control plane and Prometheus for birdwatch's tests, sandbox, demo and benchmark.

Like controller-runtime's envtest: real etcd and kube-apiserver processes (built from pinned Go modules by
``hack/install-control-plane.sh``) on free loopback ports, with TLS, a client-certificate admin, service-account
keys and RBAC; kube-controller-manager, kube-scheduler and kwok's fake nodes beside them (``workloads.py``), so
Deployments become available and namespaces are deleted as on a cluster; and a real Prometheus scraping exporters
the tests control.
"""
