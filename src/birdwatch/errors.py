"""Errors shared across layers: bad configuration, found by the CLI's checks or by the Kubernetes client at start."""


class ConfigError(ValueError):
    """Bad configuration: said in one line, exit code 2."""
