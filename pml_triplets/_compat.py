"""Probes of the running torch: compiling, a torch.func transform, autocast; and the one cast the engine uses.

Bound once at import (the engine asks a dozen times a call), with the spelling of each torch version.
"""

from __future__ import annotations

import torch

__all__: list[str] = []  # private module

# torch.compiler.is_compiling arrived in torch 2.3; torch._dynamo's has the same meaning before it.
_IS_COMPILING = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_PEEK_INTERPRETER = torch._C._functorch.peek_interpreter_stack
_INTERPRETER_STACK = getattr(torch._C._functorch, "get_interpreter_stack", None)
_JVP = torch._C._functorch.TransformType.Jvp


def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing this call.

    Example:
        >>> is_compiling()
        False
    """
    return bool(_IS_COMPILING())


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``"cpu"``, ``"cuda"``, ...).

    Example:
        >>> import torch
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_enabled("cpu")
        True
    """
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4 takes the device type
        return bool(torch.is_autocast_enabled(device_type))
    if device_type == "cpu":
        return bool(torch.is_autocast_cpu_enabled())
    return bool(torch.is_autocast_enabled())


def transformed() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is active around this call.

    Example:
        >>> import torch
        >>> bool(torch.func.grad(lambda x: x * float(transformed()))(torch.tensor(1.0)))
        True
    """
    return _PEEK_INTERPRETER() is not None


def nested_jvp() -> bool:
    """Whether two or more torch.func forward-mode transforms (``jvp``, ``jacfwd``) are active around this call."""
    if _INTERPRETER_STACK is None:  # (a torch without the query: assumed, where a transform is active at all)
        return transformed()
    return sum(1 for i in _INTERPRETER_STACK() or () if i.key() == _JVP) > 1


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``: ``x`` itself when it has it (a no-op ``.to`` still parses its arguments: microseconds).

    Example:
        >>> import torch
        >>> x = torch.ones(2)
        >>> as_dtype(x, torch.float32) is x, as_dtype(x, torch.float64).dtype
        (True, torch.float64)
    """
    return x if x.dtype == dtype else x.to(dtype)
