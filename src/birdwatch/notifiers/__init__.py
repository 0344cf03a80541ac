"""The notifiers: one module per service, each with its own queue and worker (``delivery``), routed by ``hub``.

Imports flow one way: ``hub`` → the service modules → ``delivery``, ``text`` → ``birdwatch.notify``.
"""
