"""Custom ops whose plain eager calls skip the ``torch.library`` dispatcher round trip.

Every Triton op is a ``torch.library.custom_op`` with a fake impl and autograd, so ``torch.compile(fullgraph=True)``,
``torch.export``, ``FlopCounterMode``, fake tensors and ``torch.library.opcheck`` see it. Calling such an op costs
15-25 µs of host Python per call before its implementation runs (the dispatcher, the ``autograd.Function`` that
``register_autograd`` generates, ``fill_defaults`` over the schema, the ``torch._disable_dynamo`` wrapper, the
output aliasing check): more than the GPU time of many attention kernels, several times per forward and backward.

:func:`custom_op` registers the op exactly as before and returns an :class:`EagerOp`. Called in plain eager mode
(not compiling or ``torch.jit.trace``-ing, no ``TorchDispatchMode`` such as ``FlopCounterMode`` or
``FakeTensorMode`` active, no functorch transform, only plain ``torch.Tensor`` arguments) it runs the same
implementation directly, or, when an input requires grad, the same ``setup_context`` and ``backward`` through one
``torch.autograd.Function`` (about 3 µs); in every other case it calls the registered op. Results and gradients are
identical on both paths.
"""

from collections.abc import Callable

import torch

__all__ = []


# Private torch hooks the fast path needs; on a torch without them every call takes the registered op.
_DISPATCH_STACK_LEN = getattr(torch._C, "_len_torch_dispatch_stack", None)
_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def _dispatcher_needed(args: tuple) -> bool:
    """True unless the call is plain eager on plain tensors (the registered op must see everything else)."""
    if (
        _DISPATCH_STACK_LEN is None
        or _FUNCTORCH_ACTIVE is None
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or _DISPATCH_STACK_LEN() > 0
        or _FUNCTORCH_ACTIVE()
    ):
        return True
    return any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args)


class EagerOp:
    """A registered ``torch.library`` custom op plus a direct eager path to its implementation.

    Args:
        op: the ``CustomOpDef`` returned by ``torch.library.custom_op``.
        impl: the undecorated implementation it was built from.
    """

    def __init__(self, op, impl: Callable):
        self.op = op
        self.impl = impl
        self._function = None

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Register on the op, and build the ``autograd.Function`` of the eager path from the same two functions."""
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
        self._function = type(f"{impl.__name__}_function", (torch.autograd.Function,), methods)

    def __call__(self, *args):
        if _dispatcher_needed(args):
            return self.op(*args)
        if (
            self._function is not None
            and torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        ):
            return self._function.apply(*args)
        return self.impl(*args)


def custom_op(name: str) -> Callable[[Callable], EagerOp]:
    """``torch.library.custom_op(name, mutates_args=())`` as a decorator that returns an :class:`EagerOp`."""

    def decorator(impl: Callable) -> EagerOp:
        return EagerOp(torch.library.custom_op(name, impl, mutates_args=()), impl)

    return decorator
