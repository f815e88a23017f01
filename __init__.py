"""omniace: instruction-based image editing and generation with diffusion transformers.

Sub-packages: ``omniace.kernels`` (ops and their backends), ``omniace.engine`` (packed LCU batch,
models, samplers, pipeline), ``omniace.train``, ``omniace.export``, ``omniace.bench``.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__version__ = "0.1.0"


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (availability checks, no side effects)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package, or a half-imported module
        return False


def require(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import an optional heavy dependency lazily; a missing one names the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        need = what or module
        raise ImportError(
            f"{need} needs the optional package '{module}', which is not installed: "
            f"pip install 'omniace[{extra}]'"
        ) from err
