"""Triton launches as the JIT sees them, without running them (compile checks, warm-up).

``record_launches()`` is a context in which every ``@triton.jit`` launch is recorded
instead of run: call an op's own Python launcher on ``meta`` tensors at serving shapes and
the recorded ``Launch`` rows carry exactly the grid, arguments, constexprs, ``num_warps``
and ``num_stages`` that launcher picks. ``bind(launch, target)`` then binds one the way the
JIT binds it (Triton's own generated binder: the ``== 1`` and ``% 16`` integer
specialisations, pointer alignment from ``data_ptr``, dtypes), which gives the compile
inputs and the key of the binary the JIT would cache. A meta tensor's ``data_ptr`` is its
storage offset in bytes, so views keep the alignment they have on a device whose
allocations are 16-byte aligned.

On meta tensors a host read of device data (``.item()``, ``.tolist()``, ``bool(t)``)
raises, so a launcher that runs through on meta tensors reads nothing back to the host.
``meta_sm_count`` stands in for the GPU's SM count where a launcher sizes its grid by it.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator

import triton
from triton import knobs
from triton.runtime.jit import JITFunction, create_function_from_signature

try:  # present in every triton wheel; imported lazily by triton itself
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = None

# SMs of the GPU a meta-tensor launch stands for (None: launchers act as on CPU)
meta_sm_count: contextvars.ContextVar[int | None] = contextvars.ContextVar("meta_sm_count", default=None)


@dataclass(frozen=True)
class Launch:
    kernel: Any   # the JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple
    args: tuple
    kwargs: dict  # constexprs passed by name and launch options (num_warps, num_stages)

    @property
    def name(self) -> str:
        return jit_of(self.kernel).fn.__name__


@dataclass(frozen=True)
class Binding:
    """One launch bound as the JIT binds it for a target."""

    name: str
    key: str            # the JIT's cache key of the binary: specialisation + options
    signature: dict     # argument name -> type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict    # argument path -> value (constexprs and ints specialised to 1)
    attrs: dict         # argument path -> [["tt.divisibility", 16]] etc.
    options: Any        # the backend's parsed options (num_warps, num_stages, ...)
    jit: JITFunction


@contextlib.contextmanager
def record_launches(sm_count: int | None = None, keep=lambda: True) -> Iterator[list[Launch]]:
    """Record every Triton launch made inside the block (while ``keep()``) instead of
    running it."""
    launches: list[Launch] = []
    classes = [JITFunction] + ([InterpretedFunction] if InterpretedFunction is not None else [])
    saved = [(cls, cls.__dict__["run"]) for cls in classes]

    def run(self, *args, grid, warmup, **kwargs):
        if keep():
            launches.append(Launch(self, tuple(grid) if not callable(grid) else grid, args, dict(kwargs)))

    token = meta_sm_count.set(sm_count)
    try:
        for cls, _ in saved:
            cls.run = run
        yield launches
    finally:
        for cls, original in saved:
            cls.run = original
        meta_sm_count.reset(token)


_JIT_OF: dict[int, JITFunction] = {}


def jit_of(kernel) -> JITFunction:
    """The JITFunction of a kernel; under the interpreter, one built from the same source."""
    if isinstance(kernel, JITFunction):
        return kernel
    if id(kernel) not in _JIT_OF:
        _JIT_OF[id(kernel)] = JITFunction(kernel.fn, **kernel.kwargs)
    return _JIT_OF[id(kernel)]


def gpu_target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


_BACKENDS: dict = {}
_BINDERS: dict = {}


def bind(launch: Launch, target) -> Binding:
    """Bind a recorded launch as ``JITFunction.run`` does for ``target`` (no device needed)."""
    from triton.compiler import make_backend

    jit = jit_of(launch.kernel)
    backend = _BACKENDS.get(target)
    if backend is None:
        backend = _BACKENDS[target] = make_backend(target)
    binder = _BINDERS.get((id(jit), target))
    if binder is None:
        binder = _BINDERS[(id(jit), target)] = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    key = f"{jit.fn.__name__}:{specialization}{options}"
    parsed, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return Binding(jit.fn.__name__, key, signature, constexprs, attrs, parsed, jit)


def compile_binding(binding: Binding, target):
    """The compiled kernel (ttir .. cubin) of a binding for ``target``; needs no device."""
    from triton.compiler import ASTSource

    src = ASTSource(binding.jit, binding.signature, binding.constexprs, binding.attrs)
    return triton.compile(src, target=target, options=binding.options.__dict__)


def distinct(launches: list[Launch], target) -> dict[str, tuple[Launch, Binding]]:
    """The launches that need distinct binaries on ``target``, by JIT cache key."""
    out: dict[str, tuple[Launch, Binding]] = {}
    for launch in launches:
        binding = bind(launch, target)
        out.setdefault(binding.key, (launch, binding))
    return out


# aten ops that only allocate: no kernel on a GPU
_ALLOCATIONS = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"})


def launches_kernel(func) -> bool:
    """Whether an aten op launches device work: not a pure allocation, not a view or
    alias (view, slice, t, detach, ...: a new tensor header only)."""
    schema = func._schema
    if schema.name.split("::")[-1] in _ALLOCATIONS:
        return False
    returns = schema.returns
    return not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


class LaunchCount:
    """Device launches of a block of code: aten ops that launch device work and Triton
    launches (recorded, not run: use it on meta tensors). ``opaque()`` counts a call as a
    single launch (a CUDA graph replay)."""

    def __init__(self):
        self.torch_ops: list[str] = []
        self.triton: list[Launch] = []
        self.opaque_calls = 0
        self._depth = 0

    @contextlib.contextmanager
    def opaque(self):
        self.opaque_calls += 1
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    @property
    def total(self) -> int:
        return len(self.torch_ops) + len(self.triton) + self.opaque_calls


@contextlib.contextmanager
def count_launches(sm_count: int | None = None) -> Iterator[LaunchCount]:
    """Count the device launches of the block: a model of what a GPU would get (a cuBLAS
    GEMM may launch more than one kernel), exact for Triton launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = LaunchCount()

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if count._depth == 0 and launches_kernel(func):
                count.torch_ops.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with record_launches(sm_count, keep=lambda: count._depth == 0) as launches, _Mode():
        count.triton = launches
        yield count
