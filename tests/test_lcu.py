"""Packing and validation of the LCU batch."""
import pytest
import torch

from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack, patchify, unpatchify

C, Y, P = 3, 5, 2


def img(h, w, mask=False):
    return ImageInput(torch.randn(C, h, w), (torch.rand(h, w) > 0.5).float() if mask else None)


def unit(text_len, *images, instruction="edit"):
    return ConditionUnit(instruction, list(images), text=torch.randn(text_len, Y))


def test_patchify_roundtrip_odd_grid():
    x = torch.randn(4, 6, 10)
    t = patchify(x, 2)
    assert t.shape == (15, 16)
    assert torch.equal(unpatchify(t, 6, 10, 2), x)
    assert torch.equal(t[1], x[:, 0:2, 2:4].reshape(-1))  # token (0, 1): channel-major patch


def test_pack_layout():
    s0 = LCUSample([unit(3, img(4, 6)), unit(5, img(8, 2, mask=True))], img(6, 4, mask=True))
    s1 = LCUSample([unit(7)], img(2, 10))  # text-to-image: the current unit has no images
    b = pack([s0, s1], P)
    # frames: s0 target 3x2=6, cond 2x3=6, cond 4x1=4; s1 target 1x5=5
    assert b.cu_seqlens_frame.tolist() == [0, 6, 12, 16, 21]
    assert b.cu_seqlens_sample.tolist() == [0, 16, 21]
    assert b.cu_seqlens_txt.tolist() == [0, 3, 8, 15]
    # each frame attends to its unit's text: target -> current unit (1), cond0 -> unit 0, cond1 -> unit 1
    assert b.cu_seqlens_frame_txt.tolist() == [0, 5, 8, 13, 20]
    assert b.frame_text_index[:5].tolist() == [3, 4, 5, 6, 7] and b.frame_text_index[5:8].tolist() == [0, 1, 2]
    # ACE indicators: target F-1, condition frame f -> f-1
    assert b.indicator[:6].unique().tolist() == [2] and b.indicator[6:12].unique().tolist() == [0]
    assert b.indicator[12:16].unique().tolist() == [1] and b.indicator[16:].unique().tolist() == [0]
    assert b.frame_text_indicator[:5].unique().tolist() == [2]
    # positions: (frame, row, col), rows/cols from 0 in every frame
    assert b.pos[6:12].tolist() == [[1, 0, 0], [1, 0, 1], [1, 0, 2], [1, 1, 0], [1, 1, 1], [1, 1, 2]]
    assert b.pos[16:21, 0].tolist() == [0] * 5
    assert b.is_target.tolist() == [True] * 6 + [False] * 10 + [True] * 5
    assert (b.max_seqlen_frame, b.max_seqlen_sample, b.max_seqlen_txt) == (6, 16, 7)
    assert b.tokens.shape == (21, (C + 1) * P * P)
    # mask channel is the last p*p columns; all ones where no mask was given
    assert torch.equal(b.tokens[16:, -4:], torch.ones(5, 4))
    lat = b.targets_from_tokens(b.target_tokens())
    assert torch.equal(lat[0], s0.target.latent) and torch.equal(lat[1], s1.target.latent)


def test_validation_errors_name_sample_unit_value():
    good = LCUSample([unit(3, img(4, 4))], img(4, 4))
    with pytest.raises(ValueError, match=r"sample 1, unit 0, image 0: latent size 5x4 is not a positive multiple "
                                         r"of the patch size 2 \(image sides must be multiples of patch x codec factor = 16"):
        pack([good, LCUSample([unit(3, img(5, 4))], img(4, 4))], P)
    bad = LCUSample([unit(3, img(4, 4), instruction="{image} and {image3}")], img(4, 4))
    with pytest.raises(ValueError, match=r"sample 0, unit 0: instruction names \{image3\} but the sample has 1 "
                                         r"condition image\(s\) \(\{image\}\)"):
        pack([bad], P)
    ok = LCUSample([unit(3, img(4, 4), img(2, 2), instruction="{image1} into {image}")], img(4, 4))
    pack([ok], P)
    with pytest.raises(ValueError, match="sample 0, unit 0: a history unit needs at least one image"):
        pack([LCUSample([unit(3), unit(2)], img(4, 4))], P)
    with pytest.raises(ValueError, match=r"mask shape \(3, 4\) does not match the latent 4x4"):
        pack([LCUSample([unit(3, ImageInput(torch.randn(C, 4, 4), torch.ones(3, 4)))], img(4, 4))], P)
    with pytest.raises(ValueError, match="latent has 4 channels, expected 3"):
        pack([LCUSample([unit(3, ImageInput(torch.randn(4, 4, 4)))], img(4, 4))], P)
    with pytest.raises(ValueError, match="at most 9 fit"):
        pack([LCUSample([unit(3, *[img(2, 2) for _ in range(10)])], img(4, 4))], P)
    with pytest.raises(ValueError, match="this model takes no masks"):
        pack([LCUSample([unit(3)], img(4, 4, mask=True))], P, with_mask=False)
    with pytest.raises(ValueError, match="no condition units"):
        pack([LCUSample([], img(4, 4))], P)
    with pytest.raises(ValueError, match="no text_encoder"):
        pack([LCUSample([ConditionUnit("hi")], img(4, 4))], P)
