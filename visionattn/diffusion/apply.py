"""``apply(pipe_or_model, method, **options)`` swaps self-attention for a visionattn method; ``remove`` undoes it.

``apply`` finds the denoiser (``pipe.transformer``, ``pipe.transformer_2`` for Wan 2.2, or ``pipe.unet``, or the
model itself), installs one ``<Model>MethodAttnProcessor`` per self-attention layer over the latent grid (each
with its own method instance, so learnable parts are per layer) and a forward pre-hook that tells the processors
the grid and denoising step of every call. Cross-attention and text-only attention keep their stock processors.
"""

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ._hooks import DiffusionState, _GridStepHook
from ._methods import _METHODS
from ._processor import _MethodAttnProcessor, _ModelSpec
from .cogvideox import _SPEC as _COGVIDEOX
from .flux import _SPEC as _FLUX
from .hunyuan_video import _SPEC as _HUNYUAN_VIDEO
from .ltx_video import _SPEC as _LTX_VIDEO
from .pixart import _DIT_SPEC as _DIT
from .pixart import _SPEC as _PIXART
from .sd3 import _SPEC as _SD3
from .unet import _SPEC as _UNET
from .wan import _SPEC as _WAN

__all__ = ["AttentionHandle", "apply", "remove"]

_SPECS = {s.class_name: s for s in (_COGVIDEOX, _DIT, _FLUX, _HUNYUAN_VIDEO, _LTX_VIDEO, _PIXART, _SD3, _UNET, _WAN)}
_DENOISER_ATTRS = ("transformer", "transformer_2", "unet")
#: Default schedule per method: Radial Attention's Wan 1x script keeps layer 0 and the first 12 of 50 steps dense.
_DEFAULT_SCHEDULE = {"radial": {"dense_layers": 1, "dense_steps": 12}}


@dataclass
class AttentionHandle:
    """What ``apply`` changed, so that ``remove`` can restore it; also the place to read statistics.

    Attributes:
        method: the method name.
        state: the ``DiffusionState`` of the patched models (grid, step, density statistics, mask cache); the
            experts of Wan 2.2 (``transformer`` and ``transformer_2``) share it, so steps count across both.
    """

    method: str
    state: DiffusionState
    _originals: list[tuple[nn.Module, object]] = field(default_factory=list, repr=False)
    _hooks: list = field(default_factory=list, repr=False)
    #: ``(key prefix, model)`` per patched denoiser (prefix ``""``, or ``"<pipeline attribute>."`` for several).
    _models: list[tuple[str, nn.Module]] = field(default_factory=list, repr=False)

    @property
    def processors(self) -> list[_MethodAttnProcessor]:
        """The installed processors, in layer order."""
        return [module.processor for module, _ in self._originals]

    def density(self) -> float | None:
        """Mean attention density over the calls since the last ``reset`` (dense calls count 1.0)."""
        return self.state.mean_density()

    def reset(self) -> None:
        """Start counting steps and density afresh (``apply`` detects new generations by a rising timestep)."""
        self.state.reset()

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """The methods' learnable tensors (SLA's ``proj``, LinFusion's projections), keyed as in the model's
        ``state_dict`` (``<attention module>.processor.method.*``); with several denoisers (Wan 2.2's
        ``transformer`` and ``transformer_2``) each key starts with the pipeline attribute, e.g. ``transformer_2.``.
        Save it with ``safetensors.torch.save_file``; empty for methods without parameters."""
        return {
            prefix + key: value
            for prefix, model in self._models
            for key, value in model.state_dict().items()
            if ".processor.method." in key
        }

    @torch.no_grad()
    def load_method_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy fine-tuned method tensors (as ``method_state_dict`` names them) into the patched models.

        Raises:
            ValueError: the keys differ from ``method_state_dict()``'s (both lists are in the message) or a
                tensor has another shape.
        """
        targets = self.method_state_dict()
        missing, unexpected = sorted(set(targets) - set(state_dict)), sorted(set(state_dict) - set(targets))
        if missing or unexpected:
            raise ValueError(
                f"state_dict must hold exactly the tensors of method={self.method!r} as handle.method_state_dict() "
                f"names them; got {_key_list(missing)} missing and {_key_list(unexpected)} unexpected. Save the "
                "weights with save_file(handle.method_state_dict(), path) after apply() with the same method and "
                "options on the same model."
            )
        for key, value in state_dict.items():
            if value.shape != targets[key].shape:
                raise ValueError(
                    f"state_dict[{key!r}] must have shape {tuple(targets[key].shape)}; got {tuple(value.shape)}."
                )
            targets[key].copy_(value)


def _key_list(keys: list[str], shown: int = 8) -> str:
    if not keys:
        return "no keys"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} keys ({', '.join(keys[:shown])}{more})"


def _denoisers(pipe_or_model) -> list[tuple[str, nn.Module]]:
    """``(state-dict key prefix, model)`` of every denoiser to patch."""
    if isinstance(pipe_or_model, nn.Module):
        return [("", pipe_or_model)]
    models = [(name, getattr(pipe_or_model, name, None)) for name in _DENOISER_ATTRS]
    models = [(name, m) for name, m in models if isinstance(m, nn.Module)]
    if not models:
        raise TypeError(
            f"pipe_or_model must be a diffusers pipeline with a transformer or unet, or such a model; "
            f"got {type(pipe_or_model).__name__}."
        )
    return [(f"{name}." if len(models) > 1 else "", m) for name, m in models]


def _spec_of(model: nn.Module) -> _ModelSpec:
    for cls in type(model).__mro__:
        if cls.__name__ in _SPECS:
            return _SPECS[cls.__name__]
    raise ValueError(
        f"model must be one of {sorted(_SPECS)}; got {type(model).__name__}. Other diffusers models are not supported yet."
    )


def _method_factory(method: str, options: dict, spec: _ModelSpec):
    """A ``build(head_dim, device, dtype) -> method module`` after validating the options on one instance."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {tuple(sorted(_METHODS))}; got {method=}.")
    cls = _METHODS[method]
    params = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(params) - {"head_dim", "device", "dtype"})
    if unknown:
        allowed = sorted(p for p in params if p not in ("head_dim", "device", "dtype"))
        raise TypeError(f"options {unknown} are not options of method={method!r}; its options are {allowed}.")
    takes_shape = "head_dim" in params

    def build(head_dim: int, device, dtype) -> nn.Module:
        kwargs = dict(options, head_dim=head_dim, device=device, dtype=dtype) if takes_shape else dict(options)
        instance = cls(**kwargs)
        instance.check_model(spec.class_name, 3 if spec.is_video else 2, spec.is_video)
        return instance

    return build


def _schedule(method: str, dense_layers: int | None, dense_steps: int | None) -> tuple[int, int]:
    defaults = _DEFAULT_SCHEDULE.get(method, {})
    values = (
        defaults.get("dense_layers", 0) if dense_layers is None else dense_layers,
        defaults.get("dense_steps", 0) if dense_steps is None else dense_steps,
    )
    for name, value in zip(("dense_layers", "dense_steps"), values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {name}={value!r}.")
    return values


def apply(
    pipe_or_model,
    method: str,
    *,
    dense_layers: int | None = None,
    dense_steps: int | None = None,
    **options,
) -> AttentionHandle:
    """Replace the self-attention of a diffusers pipeline or model with a visionattn method.

    Args:
        pipe_or_model: a pipeline (its ``transformer``/``transformer_2``/``unet`` is patched) or a supported model:
            ``UNet2DConditionModel``, ``FluxTransformer2DModel``, ``SD3Transformer2DModel``,
            ``PixArtTransformer2DModel``, ``DiTTransformer2DModel``, ``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``,
            ``CogVideoXTransformer3DModel``, ``LTXVideoTransformer3DModel``.
        method: ``"local"``, ``"radial"``, ``"sparse_linear"``, ``"linear"`` or ``"agent"``.
        dense_layers: the first ``dense_layers`` self-attention layers keep dense attention (radial default 1).
        dense_steps: the first ``dense_steps`` denoising steps keep dense attention (radial default 12).
        **options: the method's options (see ``LocalMethod``, ``RadialMethod``, ``SparseLinearMethod``,
            ``LinearMethod``, ``AgentMethod``).

    Returns:
        An ``AttentionHandle`` for ``remove`` and for statistics (``handle.density()``).

    Raises:
        ValueError: unknown method or model, a method that does not fit the model (the message says why), or bad
            option values; also when ``apply`` was already called on the model.
        TypeError: an option the method does not have, or an option of the wrong type.

    ``apply`` is atomic: when it raises, no model of the pipeline is left patched.

    Example:
        >>> handle = apply(pipe, "local", kernel_size=(3, 11, 11))       # doctest: +SKIP
        >>> video = pipe(prompt, num_frames=81).frames; remove(handle)   # doctest: +SKIP
    """
    schedule = _schedule(method, dense_layers, dense_steps)
    state = DiffusionState(dense_layers=schedule[0], dense_steps=schedule[1])
    handle = AttentionHandle(method=method, state=state)
    try:
        for prefix, model in _denoisers(pipe_or_model):
            _patch(handle, prefix, model, method, options)
    except BaseException:
        # atomic: a failure on a later denoiser (or layer) leaves no model patched
        remove(handle)
        raise
    return handle


def _patch(handle: AttentionHandle, prefix: str, model: nn.Module, method: str, options: dict) -> None:
    """Install the processors and the grid/step hook on one denoiser, recording them in ``handle``."""
    spec = _spec_of(model)
    build = _method_factory(method, options, spec)
    modules = [m for name, m in model.named_modules() if spec.self_attention.fullmatch(name)]
    if any(isinstance(m.processor, _MethodAttnProcessor) for m in modules):
        raise ValueError("apply() was already called on this model; call remove(handle) first.")
    param = next(model.parameters())
    processors = []
    for layer_idx, module in enumerate(modules):
        head_dim = module.to_q.out_features // module.heads
        processors.append(spec.processor_cls(build(head_dim, param.device, param.dtype), handle.state, layer_idx, spec))
    handle._models.append((prefix, model))
    for module, processor in zip(modules, processors):
        handle._originals.append((module, module.processor))
        module.set_processor(processor)
    hook = _GridStepHook(model, handle.state, spec.read_grid)
    handle._hooks.append(model.register_forward_pre_hook(hook, with_kwargs=True))


@torch.no_grad()
def remove(handle: AttentionHandle) -> None:
    """Restore the processors (the very objects) and remove the hooks that ``apply`` installed."""
    for module, original in reversed(handle._originals):
        module.set_processor(original)
    for hook in handle._hooks:
        hook.remove()
    handle._originals.clear()
    handle._hooks.clear()
    handle._models.clear()
