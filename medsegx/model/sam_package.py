"""``segment_anything.modeling`` without the package's ``__init__`` until a name of the package itself is used.

segment-anything's ``__init__`` imports its predictor, whose transforms import torchvision, whose ops import
``torch._dynamo`` (with sympy): about 1.8 s of start-up and 0.5 s of interpreter exit for every command,
none of which the networks here use (they take their modules from ``segment_anything.modeling``). The
package is registered unexecuted, with its ``__path__``, so its submodules import as usual; the first name
taken from the package itself (``from segment_anything import sam_model_registry``, ``SamPredictor``, ...)
runs its ``__init__`` then, in the same module object, and everything is as if it had run at import.
"""
from __future__ import annotations

import importlib.util
import sys

PACKAGE = "segment_anything"


def defer_package_init(name: str = PACKAGE) -> None:
    """Register ``name`` unexecuted (a no-op if it is imported already or not installed)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str):  # PEP 562: only names the module does not have yet come here
        if package.__dict__.pop("__getattr__", None) is not None:
            spec.loader.exec_module(package)  # the package's own __init__, in this module object
        try:
            return package.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    package.__getattr__ = __getattr__
    sys.modules[name] = package
