"""Chunked gated linear attention in plain PyTorch: the ``"torch"`` backend of ``ops.gated_linear_attention``.

Shapes: B = batch, H = heads, N = tokens, Dk = key/query head dim, Dv = value head dim, M = chunks, C = tokens per
chunk (``M = ceil(N / 64)``, ``C = ceil(N / M)``), Z = (chunk, key channel) pairs on the exact path.

The recurrence of ``ops/gated.py``, ``S_t = diag(exp(a_t)) S_{t-1} + k_tᵀ v_t`` and ``o_t = q_t S_t``, in GLA's
chunkwise form (Yang et al., ICML 2024, §4). With the log-gate sums of a chunk (r, s, t index its tokens)

    P_t = Σ_{r <= t} a_r,        Q_s = Σ_{r > s} a_r,        D_ts = Σ_{s < r <= t} a_r = P_t - P_s,

and ``S`` the state entering the chunk, each chunk computes

    o_t = (q_t ⊙ exp(P_t)) S + (q_t · k_t) v_t + Σ_{s < t} (Σ_d q_td exp(D_tsd) k_sd) v_s,
    S  <- diag(exp(P_last)) S + Σ_s (k_s ⊙ exp(Q_s))ᵀ v_s.

The inter-chunk factors exponentiate sums of gates only: with gates ``<= 0`` none exceeds 1, and strong gates
(``-1e4``, ``-inf``) give exact zeros. The intra-chunk scores factor as ``(q_t ⊙ exp(P_t)) · (k_s ⊙ exp(-P_s))``,
two matmuls, on every (chunk, channel) whose ``|P|`` stays within :data:`_FACTOR_BOUND`, where neither factor can
overflow and the rounding of ``P`` costs ~1e-6 relative at most. The other pairs (strong gates) take the exact path:
``exp(D)`` as a ``[C, C]`` matrix per pair, ``D`` summed from the gates themselves (never a difference of two sums,
which would cancel catastrophically or give ``-inf - -inf``). The diagonal ``q_t · k_t`` is added without gates, so
its gate gradient is exactly zero as in the recurrence. The state passing between chunks is a Python loop of M
steps; the backward scan is the forward scan of the token-reversed inputs, batched with the forward one. Gradients
come from autograd through these ops.
"""

import torch
import torch.nn.functional as F

from ._registry import _fail

__all__ = ["gated_linear_attention_chunked", "requires_torch_dtype"]

#: Most tokens per chunk: the intra-chunk scores cost C² per chunk, the state loop N / C Python steps.
_MAX_CHUNK = 64
#: Largest ``|P_t|`` (per chunk and key channel) for the factored intra-chunk scores: factors stay below
#: ``exp(16) ~ 9e6`` (the masked upper triangle below ``exp(32)`` for positive gates), and float32 rounding of
#: ``P`` moves ``exp(P_t - P_s)`` by ``~16 · 2^-24 · sqrt(C) ~ 1e-6`` relative at worst.
_FACTOR_BOUND = 16.0
#: Input dtypes of the ``"torch"`` backend; float64 stays with the token-loop reference, the tests' oracle.
_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def requires_torch_dtype(args: dict, raise_error: bool) -> bool:
    """Backend constraint: ``q`` (hence k and v) is half or single precision."""
    if args["q"].dtype in _TORCH_DTYPES:
        return True
    return _fail(
        raise_error,
        NotImplementedError,
        f"q.dtype must be one of {_TORCH_DTYPES} for backend='torch'; got q.dtype={args['q'].dtype}. "
        "Use backend='reference' for float64.",
    )


def _add_exact_scores(
    scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, log_gate: torch.Tensor, factored: torch.Tensor
) -> torch.Tensor:
    """``scores`` plus ``Σ_{s<t} q_t exp(D_ts) k_s`` of the (chunk, channel) pairs that are not ``factored``.

    ``scores`` ``[..., M, C, C]``; q, k, log_gate ``[..., M, C, Dk]``; ``factored`` ``[..., M, 1, Dk]``.
    """
    exact = (~factored).nonzero()  # [Z, len(batch) + 3]: batch..., chunk, 0, channel
    if not len(exact):
        return scores
    pairs, channel = tuple(exact[:, :-2].unbind(1)), exact[:, -1]
    q, k, log_gate = (t[(*pairs, slice(None), channel)] for t in (q, k, log_gate))  # [Z, C]
    chunk = q.shape[-1]
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)  # [t, s]: s < t
    zero = q.new_zeros(())
    # D_ts = Σ_{t' <= t} (a_t' if s < t' else 0): a sum of the gates in (s, t] only, never P_t - P_s
    steps = torch.where(strict, log_gate[:, :, None], zero)
    decay = torch.where(strict, steps.cumsum(-2).exp(), zero)
    return scores.index_put(pairs, q[:, :, None] * decay * k[:, None, :], accumulate=True)


def _chunked_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor) -> torch.Tensor:
    """The causal scan of the module docstring over ``(..., N, D)`` tensors; ``q`` already carries the scale."""
    *batch, length, dk = q.shape
    chunks = -(-length // _MAX_CHUNK)
    chunk = -(-length // chunks)
    pad = chunks * chunk - length
    if pad:  # trailing zero tokens (gate 0) change no earlier output
        q, k, v, log_gate = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_gate))
    q, k, v, log_gate = (t.unflatten(-2, (chunks, chunk)) for t in (q, k, v, log_gate))  # [..., M, C, D]

    prefix = log_gate.cumsum(-2)  # P
    suffix = F.pad(log_gate[..., 1:, :], (0, 0, 0, 1)).flip(-2).cumsum(-2).flip(-2)  # Q, from a_{s+1}, ..., a_last
    q_decayed = q * prefix.exp()

    factored = prefix.abs().amax(-2, keepdim=True) <= _FACTOR_BOUND  # [..., M, 1, Dk]
    zero = q.new_zeros(())
    k_grown = torch.where(factored, k * torch.where(factored, -prefix, zero).exp(), zero)
    scores = (q_decayed @ k_grown.transpose(-1, -2)).tril(-1)  # [..., M, C(t), C(s)]
    scores.diagonal(dim1=-2, dim2=-1).copy_((q * k).sum(-1))
    if q.device.type != "meta":  # which pairs need the exact path is data; meta tensors carry only shapes
        scores = _add_exact_scores(scores, q, k, log_gate, factored)
    out = scores @ v

    chunk_decay = prefix[..., -1, :, None].exp()  # [..., M, Dk, 1]
    updates = (k * suffix.exp()).transpose(-1, -2) @ v  # [..., M, Dk, Dv]
    state = q.new_zeros(*batch, dk, v.shape[-1])
    entering = []
    for i in range(chunks):
        entering.append(state)
        state = chunk_decay[..., i, :, :] * state + updates[..., i, :, :]
    out = out + q_decayed @ torch.stack(entering, dim=-3)
    return out.flatten(-3, -2)[..., :length, :]


def gated_linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate_fwd: torch.Tensor,
    log_gate_bwd: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``ops.gated_linear_attention`` on validated input, chunked as in the module docstring; any float dtype.

    Half-precision inputs are computed in float32 and cast back, like the reference.
    """
    if q.shape[2] == 0:
        return v.new_zeros(v.shape)
    out_dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute) * scale, k.to(compute), v.to(compute)
    if log_gate_bwd is None:
        return _chunked_scan(q, k, v, log_gate_fwd.to(compute)).to(out_dtype)
    both = [torch.stack([t, t.flip(-2)]) for t in (q, k, v)]  # the forward scan, then the backward one
    gates = torch.stack([log_gate_fwd, log_gate_bwd.flip(-2)]).to(compute)
    out = _chunked_scan(*both, gates)
    return ((out[0] + out[1].flip(-2)) / 2).to(out_dtype)
