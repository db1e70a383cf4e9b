"""A stand-in for torchvision where the installed one cannot load (CPU installs of SGLang).

PyPI's torchvision wheels do not load beside the CPU torch build, yet SGLang's vision
configs and processors import it at module level. ``install_torchvision_stub`` answers
those imports with modules whose attributes raise when used (only ``InterpolationMode``,
read at import time, is real). ``sglang-dflash serve --check`` needs it to run SGLang's
argument parser on a CPU machine; the development CPU server (``dev/cpu_shims``) too.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# Reported as the stub's version: older than any real torchvision, so version-gated
# code paths (transformers checks ">= 0.27") take their torchvision-free branch.
TORCHVISION_STUB_VERSION = "0.0.0+sglang-dflash-cpu-stub"


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _unavailable(module: str, name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{module}.{name} was called, but torchvision is a CPU stub here "
                           "(sglang_dflash.torchvision_stub): vision inputs are not supported")

    return fail


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__version__ = TORCHVISION_STUB_VERSION
        module.InterpolationMode = InterpolationMode

        def attribute(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return _unavailable(module.__name__, name)

        module.__getattr__ = attribute


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def torchvision_loads() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def install_torchvision_stub() -> bool:
    """Stub torchvision unless a working one is installed; idempotent. True if stubbed."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return True
    if torchvision_loads():
        return False
    # a half-imported real torchvision must not shadow the stub
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _StubFinder())
    return True
