"""Which backend each visionattn op call selected, so GPU tests can prove the kernels ran (not the reference)."""

import pytest

from visionattn.ops._registry import _BackendRegistry


def record_backends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Patch backend selection to append ``(op name, backend name)`` per op call to the returned list."""
    calls = []
    select = _BackendRegistry.select

    def recording_select(registry, backend, args):
        fn = select(registry, backend, args)
        for name, candidate in registry._backends.items():
            if candidate.fn is fn:
                calls.append((registry.op_name, name))
        return fn

    monkeypatch.setattr(_BackendRegistry, "select", recording_select)
    return calls
