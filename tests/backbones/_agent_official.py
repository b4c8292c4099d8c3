"""Key layouts (name -> shape) of the official Agent-Attention checkpoints, built from the module structure of
LeapLabTHU/Agent-Attention ``agent_transformer/models/agent_{deit,pvt,swin}.py`` and the released configs
``agent_transformer/cfgs/*.yaml`` (read, not imported: the reference needs timm 0.4).

Independent of ``visionattn``: the converter tests load these layouts into our models with ``strict=True``.
"""

#: The released variants: our model name -> the layout builder's arguments (from the reference's entrypoints and
#: configs; ``img_size`` is the training resolution, 448/256/288/384 for the fine-tuned checkpoints).
DEIT = {
    "agent_deit_tiny": dict(dim=192, heads=3, agent_num=49, agent_depth=12),
    "agent_deit_small": dict(dim=384, heads=6, agent_num=49, agent_depth=12),
    "agent_deit_base": dict(dim=768, heads=12, agent_num=81, agent_depth=4),  # agent_layer=4, NUM 81-81-81-81
}
PVT = {
    "agent_pvt_tiny": dict(depths=(2, 2, 2, 2)),
    "agent_pvt_small": dict(depths=(3, 4, 6, 3)),
    "agent_pvt_medium": dict(depths=(3, 4, 18, 3)),
    "agent_pvt_large": dict(depths=(3, 8, 27, 3)),
}
SWIN = {
    "agent_swin_tiny": dict(dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), attn_type="AAAB"),
    "agent_swin_small": dict(dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24), attn_type="AABB"),
    "agent_swin_base": dict(dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), attn_type="AAMB2"),
}


def _agent_attn(prefix: str, c: int, heads: int, n: int, size: tuple[int, int], cls: bool = False) -> dict:
    """``AgentAttention``: qkv (or q/kv) added by the caller; dwc, the seven agent biases, proj."""
    h, w = size
    d = {
        f"{prefix}dwc.weight": (c, 1, 3, 3),
        f"{prefix}dwc.bias": (c,),
        f"{prefix}an_bias": (heads, n, 7, 7),
        f"{prefix}na_bias": (heads, n, 7, 7),
        f"{prefix}ah_bias": (1, heads, n, h, 1),
        f"{prefix}aw_bias": (1, heads, n, 1, w),
        f"{prefix}ha_bias": (1, heads, h, 1, n),
        f"{prefix}wa_bias": (1, heads, 1, w, n),
        f"{prefix}proj.weight": (c, c),
        f"{prefix}proj.bias": (c,),
    }
    if cls:
        d.update({f"{prefix}ac_bias": (1, heads, n, 1), f"{prefix}ca_bias": (1, heads, 1, n)})
    return d


def _linear(prefix: str, c_out: int, c_in: int, bias: bool = True) -> dict:
    d = {f"{prefix}.weight": (c_out, c_in)}
    if bias:
        d[f"{prefix}.bias"] = (c_out,)
    return d


def _norm(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _block_common(prefix: str, c: int, ratio: int) -> dict:
    """norm1, norm2 and the two-layer MLP of every block."""
    d = {**_norm(f"{prefix}norm1", c), **_norm(f"{prefix}norm2", c)}
    d.update(_linear(f"{prefix}mlp.fc1", ratio * c, c))
    d.update(_linear(f"{prefix}mlp.fc2", c, ratio * c))
    return d


def deit(dim: int, heads: int, agent_num: int, agent_depth: int, img_size: int = 224) -> dict:
    """``agent_deit.py`` ``VisionTransformer``: 12 blocks, the first ``agent_depth`` ``AgentBlock`` (biases for the
    ``img_size // 16`` grid, cls biases), the rest timm-0.4 ``Block`` (qkv + proj)."""
    grid = img_size // 16
    d = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim), "patch_embed.proj.weight": (dim, 3, 16, 16)}
    d.update({"patch_embed.proj.bias": (dim,), **_norm("norm", dim), **_linear("head", 1000, dim)})
    for i in range(12):
        pre = f"blocks.{i}."
        d.update(_block_common(pre, dim, 4))
        d.update(_linear(f"{pre}attn.qkv", 3 * dim, dim))
        if i < agent_depth:
            d.update(_agent_attn(f"{pre}attn.", dim, heads, agent_num, (grid, grid), cls=True))
        else:
            d.update(_linear(f"{pre}attn.proj", dim, dim))
    return d


def pvt(depths: tuple[int, ...], img_size: int = 224) -> dict:
    """``agent_pvt.py`` ``PyramidVisionTransformer`` (``attn_type='AAAA'``, agents 9-16-49-49, agent sr 1): per
    stage ``patch_embed{s}``, ``pos_embed{s}`` (no cls token), ``block{s}.{j}`` with q and kv projections; no final
    norm."""
    dims, heads, ratios, agents = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (9, 16, 49, 49)
    d, c_in = _linear("head", 1000, 512), 3
    for i, depth in enumerate(depths):
        c, patch, size, s = dims[i], 4 if i == 0 else 2, img_size // 4 >> i, i + 1
        d.update({f"patch_embed{s}.proj.weight": (c, c_in, patch, patch), f"patch_embed{s}.proj.bias": (c,)})
        d.update(_norm(f"patch_embed{s}.norm", c))
        d[f"pos_embed{s}"] = (1, size * size, c)
        for j in range(depth):
            pre = f"block{s}.{j}."
            d.update(_block_common(pre, c, ratios[i]))
            d.update({**_linear(f"{pre}attn.q", c, c), **_linear(f"{pre}attn.kv", 2 * c, c)})
            d.update(_agent_attn(f"{pre}attn.", c, heads[i], agents[i], (size, size)))
        c_in = c
    return d


def _swin_block_types(attn_type: str, stage: int, depth: int) -> list[str]:
    """'A'/'B' per block of a stage: the config's letter for the stage, or ``M<k>`` = k A-blocks then B-blocks."""
    letter = attn_type[stage]
    if letter != "M":
        return [letter] * depth
    agents = int(attn_type[len("AAAB") :])
    return ["A" if j < agents else "B" for j in range(depth)]


def swin(dim: int, depths: tuple[int, ...], heads: tuple[int, ...], attn_type: str, img_size: int = 224) -> dict:
    """``agent_swin.py`` ``SwinTransformer`` with ``WINDOW_SIZE = img_size // 4`` (56 at 224, 72 at 288, 96 at 384).

    A-blocks: ``AgentAttention`` over the whole stage map (the window covers it). B-blocks: ``WindowAttention``
    with window ``max(7, WINDOW_SIZE // 8)`` (clipped to the map), relative position table and index, and the
    persistent ``attn_mask`` buffer on odd (shifted) blocks whose map is larger than the window. Patch merging
    sits at the end of stages 1-3 (``layers.{i}.downsample``).
    """
    agents, window = (9, 16, 49, 49), img_size // 4
    d = {"patch_embed.proj.weight": (dim, 3, 4, 4), "patch_embed.proj.bias": (dim,), **_norm("patch_embed.norm", dim)}
    d.update({**_norm("norm", dim * 8), **_linear("head", 1000, dim * 8)})
    for i, depth in enumerate(depths):
        c, size = dim << i, img_size // 4 >> i
        for j, kind in enumerate(_swin_block_types(attn_type, i, depth)):
            pre = f"layers.{i}.blocks.{j}."
            d.update(_block_common(pre, c, 4))
            d.update(_linear(f"{pre}attn.qkv", 3 * c, c))
            if kind == "A":
                d.update(_agent_attn(f"{pre}attn.", c, heads[i], agents[i], (size, size)))
                continue
            ws = min(max(7, window // 8), size)
            d.update(_linear(f"{pre}attn.proj", c, c))
            d[f"{pre}attn.relative_position_bias_table"] = ((2 * ws - 1) ** 2, heads[i])
            d[f"{pre}attn.relative_position_index"] = (ws * ws, ws * ws)
            if j % 2 == 1 and size > ws:
                d[f"{pre}attn_mask"] = ((size // ws) ** 2, ws * ws, ws * ws)
        if i < len(depths) - 1:
            d.update(_linear(f"layers.{i}.downsample.reduction", 2 * c, 4 * c, bias=False))
            d.update(_norm(f"layers.{i}.downsample.norm", 4 * c))
    return d


def layout(name: str, img_size: int = 224) -> dict:
    """The official key layout of our model ``name`` (trained at ``img_size``)."""
    for table, build in ((DEIT, deit), (PVT, pvt), (SWIN, swin)):
        if name in table:
            return build(**table[name], img_size=img_size)
    raise KeyError(name)
