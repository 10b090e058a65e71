"""Loading the compiled extension ``kfac_cuda._C`` and saying why it is missing.

``pip install .`` compiles ``kfac_cuda._C`` with nvcc when it finds one; otherwise the
package installs as pure Python and every op runs on its PyTorch reference. These two
calls tell the difference between "not built" and "built but broken".
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_loaded = False


def _load() -> None:
    global _module, _error, _loaded
    if _loaded:
        return
    _loaded = True
    if importlib.util.find_spec("kfac_cuda._C") is None:
        _error = (
            "kfac_cuda._C was not built (no nvcc found at install time, or the package was "
            "installed without compiling); reinstall with nvcc on PATH or CUDA_HOME set, and "
            "KFAC_CUDA_FORCE_BUILD=1 to make a failed build an error"
        )
        return
    try:
        _module = importlib.import_module("kfac_cuda._C")
    except ImportError as exc:  # built, but cannot be loaded here
        _error = f"kfac_cuda._C is built but failed to import: {exc}"


def cuda_extension_available() -> bool:
    """True when the compiled CUDA extension ``kfac_cuda._C`` is loaded."""
    _load()
    return _module is not None


def cuda_extension_error() -> Optional[str]:
    """Why the extension is unavailable (None when it loaded)."""
    _load()
    return _error


def extension() -> ModuleType:
    """The loaded ``kfac_cuda._C`` module; raises RuntimeError naming the reason otherwise."""
    _load()
    if _module is None:
        raise RuntimeError(_error)
    return _module
