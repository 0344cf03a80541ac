"""kubernetes_asyncio's configuration and credential modules, without the generated client they sit beside.

birdwatch talks to the API server through its own REST client (``kube.py``) and takes only the configuration
from kubernetes_asyncio: ``Configuration``, ``KubeConfigLoader`` and ``KubeConfigMerger`` (exec plugins, OIDC,
token files, client certificates), ``load_incluster_config`` (with its token-refresh hook). Imported the ordinary
way, those cost 38 MB of RSS and 0.4 s: ``kubernetes_asyncio/__init__.py`` imports ``client``, whose
``__init__`` imports every generated API class and, through ``api_client``, ``client/models/__init__.py`` with
all of its 1,500 model classes, none of which birdwatch calls. The credential modules themselves need little:
``config/kube_config.py`` does ``from kubernetes_asyncio.client import ApiClient, Configuration``, and
``api_client.py`` does ``import kubernetes_asyncio.client.models`` (it looks model classes up only when it
deserialises a response).

So, before the first import of kubernetes_asyncio in the process, the three heavy packages (``kubernetes_asyncio``,
``kubernetes_asyncio.client``, ``kubernetes_asyncio.client.models``) are put in ``sys.modules`` as modules made
from their own specs with ``importlib.util.module_from_spec`` (the import system's own recipe, see "Approximating
importlib.import_module()" in the importlib docs), with their ``__init__`` not run yet: importing their
submodules works as usual, because a package is found by its ``__path__``. Each gets a module ``__getattr__``
(PEP 562): a submodule's name imports that submodule; any other name first runs the package's real ``__init__``
in that same module object and answers from it. Nothing is lost and nothing is copied: code in the same process
that uses the whole library (the tests, the mesh simulator) gets ``client.CustomObjectsApi`` or
``models.V1Pod`` on first use, and the classes birdwatch holds (``Configuration``, ``ConfigException``) are the
very ones the rest of the library uses. When kubernetes_asyncio was imported before this module, it is used as
it is.

Two more imports of those modules load what birdwatch never runs, so they wait for first use too (4 MB of RSS):
``client/configuration.py`` does ``import urllib3`` (only for ``get_basic_auth_token``: ``urllib3.util``), so
``urllib3`` is deferred the same way when nothing imported it yet (``urllib3.util`` and the other submodules
import as usual; any other name runs its ``__init__``); and ``kube_config.py``'s ``ApiClient``, which it calls
only in ``new_client_from_config*``, is a stand-in that imports ``client/api_client.py`` (python-dateutil,
``multiprocessing.pool``) on its first call and puts the real class in its place, as the package's ``__init__``
also does when it runs.

The names re-exported here are the library's own, unchanged; what they do (exec plugin and OIDC refresh,
token files, in-cluster token re-reads) is the library's. ``tests/test_lean_import.py`` checks, in a fresh
interpreter, that importing birdwatch loads no generated model, that credentials load and refresh, and that the
whole client still works afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_HEAVY = ("kubernetes_asyncio", "kubernetes_asyncio.client", "kubernetes_asyncio.client.models")
_KUBE_CONFIG = "kubernetes_asyncio.config.kube_config"
_completing = threading.RLock()


class _ApiClientOnFirstCall:
    """``kube_config.ApiClient`` until the real class is loaded: calling it loads it and makes the call."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        real = importlib.import_module("kubernetes_asyncio.client.api_client").ApiClient
        _settle()
        return real(*args, **kwargs)


def _settle() -> None:
    # Once the real ApiClient is loaded (by a call to the stand-in or by the client package's __init__), it is the
    # one kube_config calls and names: the same class as everywhere else in the library.
    api_client = sys.modules.get("kubernetes_asyncio.client.api_client")
    kube_config = sys.modules.get(_KUBE_CONFIG)
    if (
        api_client is not None
        and kube_config is not None
        and vars(kube_config).get("ApiClient") is _ApiClientOnFirstCall
    ):
        setattr(kube_config, "ApiClient", api_client.ApiClient)  # noqa: B010 - a module attribute mypy cannot see


def _defer(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not an importable package", name=name)
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    initialised = False

    def getattr_(attr: str) -> Any:
        nonlocal initialised
        if not attr.startswith("__") and importlib.util.find_spec(f"{name}.{attr}") is not None:
            # `from package import submodule` asks the package first: that must not run the package's __init__.
            return importlib.import_module(f"{name}.{attr}")
        with _completing:
            if initialised:  # asked again while the __init__ runs (or after it): as a partly initialised module
                raise AttributeError(f"module {name!r} has no attribute {attr!r}")
            initialised = True
            del module.__dict__["__getattr__"]
            loader.exec_module(module)
            _settle()
        return getattr(module, attr)

    module.__dict__["__getattr__"] = getattr_
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _prepare() -> None:
    if "kubernetes_asyncio" in sys.modules:
        return
    tops = ("kubernetes_asyncio",) if "urllib3" in sys.modules else ("kubernetes_asyncio", "urllib3")
    try:
        for name in (*_HEAVY, *tops[1:]):
            _defer(name)
        # The two names config/kube_config.py takes from the client package, as its __init__ would set them (the
        # ApiClient a stand-in, see above) until kube_config has them.
        client = vars(sys.modules["kubernetes_asyncio.client"])
        client["Configuration"] = importlib.import_module("kubernetes_asyncio.client.configuration").Configuration
        client["ApiClient"] = _ApiClientOnFirstCall
        try:
            importlib.import_module(_KUBE_CONFIG)
        finally:
            # The package itself answers with the real class: asked for, it runs the package's __init__.
            del client["ApiClient"]
    except BaseException:
        # Leave nothing half-made behind: the ordinary import is still there to be done.
        for name in [n for n in sys.modules if n.partition(".")[0] in tops]:
            del sys.modules[name]
        raise


_prepare()

from kubernetes_asyncio.client.configuration import Configuration  # noqa: E402 - after _prepare(), by design
from kubernetes_asyncio.config.config_exception import ConfigException  # noqa: E402
from kubernetes_asyncio.config.incluster_config import load_incluster_config  # noqa: E402
from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger  # noqa: E402

__all__ = ["ConfigException", "Configuration", "KubeConfigLoader", "KubeConfigMerger", "load_incluster_config"]
