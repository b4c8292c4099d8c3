import pytest
import torch

from visionattn.layout import radial_block_mask


def _reference_radial(num_frames, tokens_per_frame, block_size, decay_factor, sink, extra_tokens):
    """Token-level transcription of the reference ``gen_log_mask_shrinked`` (dense masks, float32 shrink rule).

    The final matrix has ``ceil(S / Bk)`` blocks and frame-pair tiles are clipped at its edge (the reference sizes
    it from a padded sequence length).
    """
    p, b = tokens_per_frame, block_size
    video = num_frames * p
    blocks = -(-(video + extra_tokens) // b)
    final = torch.zeros(blocks, blocks, dtype=torch.bool)
    idx = torch.arange(p)
    for i in range(num_frames):
        for j in range(num_frames):
            dist = abs(i - j)
            group = dist.bit_length()
            if sink and j == 0:
                local = torch.ones(p, p, dtype=torch.bool)
            else:
                if dist <= 1:
                    width = p
                else:
                    decay = 2 ** p.bit_length() / 2**group * decay_factor
                    width = decay if decay >= b else b
                local = (idx[None, :] - idx[:, None]).abs() <= width
                length = 2 ** p.bit_length() / 2**group
                if length < 128 and dist % int(128 / length) != 0:
                    local = torch.zeros_like(local)
            r_row, r_col = (i * p) % b, (j * p) % b
            c = (p - 1) // b + 1
            padded = torch.zeros(r_row + c * b, r_col + c * b, dtype=torch.bool)
            padded[r_row : r_row + p, r_col : r_col + p] = local
            tiles = padded[: c * b, : c * b].reshape(c, b, c, b)
            col_density = tiles.sum(dim=1) / b
            high = (col_density > 1 / 3).sum(-1)
            frac = high / ((col_density > 0).sum(-1) + 1e-9)
            shrunk = frac > 0.6
            rs, cs = (i * p) // b, (j * p) // b
            view = final[rs : rs + c, cs : cs + c]
            view |= shrunk[: view.shape[0], : view.shape[1]]
    final[video // b :] = True
    final[:, video // b :] = True
    return final


@pytest.mark.parametrize(
    "frames,per_frame,block,decay,sink,extra",
    [
        (12, 300, 64, 1.0, True, 0),
        (12, 300, 64, 0.5, False, 50),
        (9, 130, 32, 0.7, False, 17),
        (5, 100, 64, 1.0, True, 0),
    ],
    ids=lambda v: str(v),
)
def test_radial_block_mask_matches_reference_transcription(frames, per_frame, block, decay, sink, extra):
    mask = radial_block_mask(frames, per_frame, block, decay, sink, extra)
    expected = _reference_radial(frames, per_frame, block, decay, sink, extra)
    keep, partial = mask.to_block_matrix()
    assert torch.equal(keep[0, 0], expected)
    assert not partial.any()
    assert mask.q_len == mask.kv_len == frames * per_frame + extra


# Block densities of the reference mask at its repository's script settings (N // 128 video blocks per side)
RADIAL_TABLE = [
    pytest.param(18, 3840, 0.2, True, 0.287, id="wan-1x"),
    pytest.param(30, 3840, 0.95, False, 0.275, id="hunyuan-1x"),
    pytest.param(41, 3600, 0.2, True, 0.176, id="wan-2x"),
    pytest.param(128, 3600, 0.95, False, 0.107, id="hunyuan-4x", marks=pytest.mark.slow),
    pytest.param(21, 1560, 1.0, True, 0.445, id="wan-1.3b-480p"),
]


@pytest.mark.parametrize("frames,per_frame,decay,sink,density", RADIAL_TABLE)
def test_radial_block_mask_reproduces_density_table(frames, per_frame, decay, sink, density):
    mask = radial_block_mask(frames, per_frame, 128, decay, sink)
    video_blocks = frames * per_frame // 128
    keep = mask.to_block_matrix()[0][0, 0, :video_blocks, :video_blocks]
    assert keep.float().mean().item() == pytest.approx(density, abs=0.005)


def test_radial_block_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        radial_block_mask(0, 100)
    with pytest.raises(TypeError, match="tokens_per_frame"):
        radial_block_mask(4, 1.5)
    with pytest.raises(ValueError, match="block_size"):
        radial_block_mask(4, 100, block_size=0)
    with pytest.raises(ValueError, match="decay_factor"):
        radial_block_mask(4, 100, decay_factor=0.0)
    with pytest.raises(ValueError, match="extra_tokens"):
        radial_block_mask(4, 100, extra_tokens=-1)
    with pytest.raises(TypeError, match="sink"):
        radial_block_mask(4, 100, sink="wan")
