"""Metric providers: the backends a canary's health number can come from.

``base`` holds the interface every provider speaks and ``errors`` the failures they share; ``registry`` builds the
named providers from the providers file (``config``) and the default ``prometheus``; one module per type speaks
that backend's API. This package imports none of its modules itself, so importing the errors stays cheap.
"""
