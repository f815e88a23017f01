"""The embedded default's model pieces (ace-edit): the gated source skip, the word-level text encoder, and the
training options tried for it (edit-region and per-task loss weights)."""
import re

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from omniace.engine import build_model, get_config
from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack
from omniace.engine.sampler import DDIMSampler
from omniace.train.objective import Objective, edit_region_weight

from helpers import randomise

C, P, Y = 3, 2, 12


def _r(g, *shape):
    return torch.randn(*shape, generator=g)


def _samples(seed: int = 0):
    """An edit with a history turn (source = frame 2), a text-to-image sample, an edit whose image is another
    size (no source), a two-image edit (source = its first image); odd grids."""
    g = torch.Generator().manual_seed(seed)
    return [
        LCUSample([ConditionUnit("", [ImageInput(_r(g, C, 6, 6))], text=_r(g, 5, Y)),
                   ConditionUnit("", [ImageInput(_r(g, C, 6, 10), (_r(g, 6, 10) > 0).float())], text=_r(g, 7, Y))],
                  ImageInput(_r(g, C, 6, 10))),
        LCUSample([ConditionUnit("", [], text=_r(g, 4, Y))], ImageInput(_r(g, C, 2, 14))),
        LCUSample([ConditionUnit("", [ImageInput(_r(g, C, 4, 4))], text=_r(g, 3, Y))], ImageInput(_r(g, C, 6, 6))),
        LCUSample([ConditionUnit("", [ImageInput(_r(g, C, 10, 2)), ImageInput(_r(g, C, 10, 2))], text=_r(g, 6, Y))],
                  ImageInput(_r(g, C, 10, 2))),
    ]


def test_source_index_points_at_the_current_units_first_image():
    samples = _samples()
    batch = pack(samples, P, with_mask=True)
    idx = batch.source_index
    assert idx.shape == batch.target_index.shape and idx.dtype == torch.int64
    c = C * P * P
    cu = batch.cu_seqlens_target()
    for b, s in enumerate(samples):
        rows = idx[cu[b]:cu[b + 1]]
        current = s.units[-1].images
        if b in (1, 2):  # no image; an image of another size
            assert (rows == -1).all()
            continue
        # the rows hold the source latent, cell for cell
        expect = pack([LCUSample([ConditionUnit("", [], text=torch.zeros(1, Y))], ImageInput(current[0].latent))],
                      P, with_mask=True).target_tokens()
        assert torch.equal(batch.tokens[rows, :c], expect)
        assert not batch.is_target[rows].any()


def _gate_model(seed: int = 0, **over):
    cfg = get_config("ace-tiny", in_channels=C, y_channels=Y, prediction="x0", source_skip=True, **over)
    return build_model(cfg)


def test_an_untrained_head_copies_the_source_and_text_to_image_starts_from_zero():
    torch.manual_seed(0)
    for gate in (False, True):
        model = _gate_model(source_gate=gate).eval()  # zero-initialised final layer
        batch = pack(_samples(1), P, with_mask=True)
        x = torch.randn(batch.target_index.numel(), C * P * P)
        with torch.no_grad():
            out = model(batch, x, torch.tensor([5, 500, 999, 10]))
        idx = batch.source_index
        has = idx >= 0
        assert torch.equal(out[has], batch.tokens[idx[has], :C * P * P])
        assert torch.equal(out[~has], torch.zeros_like(out[~has]))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_gated_output_is_source_plus_sigmoid_gate_times_change(dtype, tol):
    """Reference: the same weights without the skip give the raw head; rebuild the gated output from it."""
    gated = randomise(_gate_model(source_gate=True), seed=3, std=0.1).to(dtype).eval()
    raw = build_model(get_config("ace-tiny", in_channels=C, y_channels=Y, prediction="x0", pred_sigma=True))
    raw.load_state_dict(gated.state_dict())
    raw = raw.to(dtype).eval()
    batch = pack(_samples(2), P, with_mask=True).to("cpu", dtype)
    x = torch.randn(batch.target_index.numel(), C * P * P).to(dtype)
    t = torch.tensor([3, 400, 999, 77])
    with torch.no_grad():
        out = gated(batch, x, t).float()
        # the head's full (p, p, 2C) output -> change (first C) and gate (last C), both in token layout
        head = raw.final_layer  # capture the head's input through a hook
        seen = {}
        handle = head.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
        raw(batch, x, t)
        handle.remove()
    full = seen["o"].float().unflatten(-1, (P, P, 2 * C))
    change = full[..., :C].permute(0, 3, 1, 2).flatten(1)
    gate = torch.sigmoid(full[..., C:].permute(0, 3, 1, 2).flatten(1))
    idx = batch.source_index
    has = (idx >= 0).unsqueeze(1)
    source = batch.tokens.float()[idx.clamp(min=0), :C * P * P] * has
    ref = source + change * torch.where(has, gate, torch.ones_like(gate))
    assert (out - ref).abs().max() < tol * max(1.0, ref.abs().max().item())
    assert (gate[has.expand_as(gate)] - 0.5).abs().max() > 0.05  # the gate really varies here


def test_gate_gradients_reach_every_part():
    model = randomise(_gate_model(source_gate=True), seed=4, std=0.1)
    batch = pack(_samples(3), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), C * P * P)
    model(batch, x, torch.tensor([1, 2, 3, 4])).pow(2).sum().backward()
    w = model.final_layer.linear.weight.grad.unflatten(0, (P, P, 2 * C))
    assert w[..., :C, :].abs().sum() > 0 and w[..., C:, :].abs().sum() > 0  # change and gate rows


def test_skip_and_gate_settings_are_checked():
    with pytest.raises(ValueError, match="prediction must be 'x0'"):
        get_config("ace-tiny", source_skip=True)
    with pytest.raises(ValueError, match="source_gate .* needs source_skip=True and pred_sigma=True"):
        get_config("ace-tiny", prediction="x0", source_gate=True)
    with pytest.raises(ValueError, match="pred_sigma"):
        get_config("ace-tiny", prediction="x0", source_skip=True, source_gate=True, pred_sigma=False)
    model = _gate_model()
    batch = pack(_samples(), P, with_mask=True)
    batch.source_index = None
    with pytest.raises(ValueError, match="needs source_index"):
        model(batch, torch.zeros(batch.target_index.numel(), C * P * P), torch.zeros(4))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_source_concat_adds_each_target_tokens_embedded_source_cell(dtype, tol):
    """Reference: the first block's input of the same weights without ``source_concat``, plus the embedding of
    each target token's source cell read by a loop over ``source_index`` (zeros where -1); other rows unchanged."""
    cat = randomise(_gate_model(source_gate=True, source_concat=True), seed=5, std=0.1).to(dtype).eval()
    plain = _gate_model(source_gate=True)
    plain.load_state_dict({k: v for k, v in cat.state_dict().items() if not k.startswith("source_embedder")})
    plain = plain.to(dtype).eval()
    batch = pack(_samples(6), P, with_mask=True).to("cpu", dtype)
    x = torch.randn(batch.target_index.numel(), C * P * P).to(dtype)
    t = torch.tensor([3, 400, 999, 77])
    seen = []
    for model in (cat, plain):
        handle = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].float()))
        with torch.no_grad():
            model(batch, x, t)
        handle.remove()
    w = cat.source_embedder.weight.float()
    ref = seen[1].clone()
    for tok, src in zip(batch.target_index.tolist(), batch.source_index.tolist()):
        cell = batch.tokens[src, :C * P * P].float() if src >= 0 else torch.zeros(C * P * P)
        ref[tok] += w @ cell
    assert (seen[0] - ref).abs().max() < tol * max(1.0, ref.abs().max().item())
    moved = (seen[0] - seen[1]).abs().amax(1) > 0
    assert moved[batch.target_index[batch.source_index >= 0]].all()  # every target token with a source moved
    assert not moved[~batch.is_target].any()  # condition images and history untouched


def test_source_concat_trains_and_is_checked():
    model = randomise(_gate_model(source_gate=True, source_concat=True), seed=7, std=0.1)
    batch = pack(_samples(8), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), C * P * P)
    model(batch, x, torch.tensor([1, 200, 3, 999])).pow(2).sum().backward()
    assert model.source_embedder.weight.grad.abs().sum() > 0
    plain = _gate_model(source_gate=True)  # one more matmul: 12 target tokens' cells of C*P*P values to d
    assert model.flops([[12]], [[7]]) - plain.flops([[12]], [[7]]) == 2 * 12 * C * P * P * model.cfg.hidden_size
    with pytest.raises(ValueError, match="source_concat .* needs a model with the source skip .* got "
                                         "source_skip=False, prediction='x0'"):
        get_config("ace-tiny", prediction="x0", source_concat=True)
    with pytest.raises(ValueError, match="source_concat must be True or False, got 1"):
        get_config("ace-edit", source_concat=1)
    assert build_model(get_config("ace-edit")).source_embedder is None  # the default keeps ACE's input


def test_edit_region_weight_marks_what_differs_from_the_source():
    g = torch.Generator().manual_seed(5)
    src = torch.rand(C, 6, 8, generator=g) * 2 - 1
    tgt = src.clone()
    tgt[:, 1:3, 2:5] += 0.5  # an odd-sized edited block
    tgt[:, 5, 7] += 0.01  # below the threshold: unchanged
    samples = [LCUSample([ConditionUnit("", [ImageInput(src)], text=_r(g, 3, Y))], ImageInput(tgt)),
               LCUSample([ConditionUnit("", [], text=_r(g, 3, Y))], ImageInput(tgt))]  # text-to-image
    batch = pack(samples, P, with_mask=True)
    assert edit_region_weight(batch, 0.0) is None
    w = edit_region_weight(batch, 3.0)
    assert w.shape == batch.target_tokens().shape
    cu = batch.cu_seqlens_target()
    changed = torch.zeros(C, 6, 8)
    changed[:, 1:3, 2:5] = 1
    expect = 1 + 3 * batch.tokens_from_targets([changed, torch.zeros(C, 6, 8)])[:cu[1]]
    assert torch.equal(w[:cu[1]], expect)
    assert torch.equal(w[cu[1]:], torch.ones_like(w[cu[1]:]))  # no source: plain weight
    # per_sample with the weight: the edited elements count 4x
    pred = batch.target_tokens() + 0.1
    sample_of = batch.sample_of_token.index_select(0, batch.target_index)
    plain = Objective.per_sample(pred, batch.target_tokens(), sample_of, 2)
    weighted = Objective.per_sample(pred, batch.target_tokens(), sample_of, 2, w)
    assert torch.allclose(weighted[0], plain[0] * expect.mean(), rtol=1e-5)
    assert torch.allclose(weighted[1], plain[1], rtol=1e-6)


def test_a_negative_edit_weight_is_refused_by_name():
    from omniace.train.trainer import TrainConfig

    with pytest.raises(ValueError, match="edit_weight must be a finite number >= 0, got -1.0"):
        TrainConfig(data=["x"], edit_weight=-1.0)
    with pytest.raises(ValueError, match="edit_weight must be a finite number >= 0, got nan"):
        TrainConfig(data=["x"], edit_weight=float("nan"))


def test_word_encoder_is_deterministic_word_level_and_cuts_with_a_warning():
    from omniace.engine.pipeline import tiny_text_encoder
    from omniace.engine.text import TruncationWarning, WordTextEncoder, indicator_table

    enc = tiny_text_encoder(get_config("ace-edit"))
    assert isinstance(enc, WordTextEncoder) and enc.dim == get_config("ace-edit").y_channels
    assert enc.words("{image1} Paint the RED square, now!") == ["{image1}", "paint", "the", "red", "square", ",",
                                                               "now", "!"]
    a, b = enc.encode(["{image} make the red square blue", ""])
    assert a.tokens.shape == (7, enc.dim) and b.tokens.shape == (1, enc.dim)  # 6 words + EOS; EOS alone
    # a word's vector does not depend on the process or its neighbours: a fresh encoder, another sentence
    other = WordTextEncoder(enc.dim, enc.max_len).encode(["blue red"])[0].tokens
    assert torch.allclose(other[1] - enc.pos[1], a.tokens[3] - enc.pos[3], atol=1e-6)  # "red"
    assert (a.tokens[3] - enc.pos[3] - a.tokens[5] + enc.pos[5]).abs().max() > 0.5  # red != blue
    table = indicator_table(enc)
    assert table.shape == (10, enc.dim) and len({tuple(r.tolist()) for r in table}) == 10
    short = WordTextEncoder(8, max_len=4)
    with pytest.warns(TruncationWarning, match="5 words; the word-level text encoder keeps 3: dropped 'd e'"):
        assert short.encode(["a b c d e"])[0].tokens.shape == (4, 8)
    with pytest.raises(ValueError, match="dropped|drop 'd e'"):
        short.encode(["a b c d e"], truncate=False)
    with pytest.raises(ValueError, match="text_encoder 'chars'; expected 'bytes' or 'words'"):
        get_config("ace-tiny", text_encoder="chars")


def test_task_weights_parse_from_the_flag_and_refuse_bad_entries_by_name():
    from omniace.train.synthetic import TASKS
    from omniace.train.trainer import TrainConfig, build_parser

    a = build_parser().parse_args(["--data", "x", "--task-weight", "object_swap=4, inpainting=2.5"])
    assert TrainConfig(data=["x"], task_weight=a.task_weight).task_weights() == {"object_swap": 4.0, "inpainting": 2.5}
    assert TrainConfig(data=["x"]).task_weights() == {}
    for bad in ("object_swap", "a=-1", "=2", "a=x", "a=inf"):
        with pytest.raises(ValueError, match=f"task_weight entry '{bad}': expected TASK=W with W a finite number >= 0"):
            TrainConfig(data=["x"], task_weight=[bad])
    # the same task twice: the last used to win silently (the flag's own value, and across entries)
    for twice, first in (("object_swap=4,object_swap=2", "4"), ("fog=0, fog =0", "0")):
        a = build_parser().parse_args(["--data", "x", "--task-weight", twice])
        entry = twice.split(",")[1].strip()
        with pytest.raises(ValueError, match=f"task_weight entry '{entry}': task '{twice.split('=')[0]}' is already "
                                             f"weighted {first}; give each task once"):
            TrainConfig(data=["x"], task_weight=a.task_weight)
    # a task no corpus of ours has is allowed (a corpus may name its own) but warned about
    cfg = TrainConfig(data=["x"], task_weight=["objet_swap=2", "inpainting=2", "my_task=3"])
    assert [w for w in cfg.warnings() if "task" in w] == [
        (f"--task-weight names task(s) ['objet_swap', 'my_task'] that are none of the known {TASKS}: they weight "
         f"only rows whose task column says exactly that")]
    assert not [w for w in TrainConfig(data=["x"], task_weight=["object_swap=2"]).warnings() if "task" in w]
    from omniace.train.objective import sample_weights

    w = sample_weights(torch.tensor([1.0, 0.0, 1.0]), ["object_swap", "object_swap", "fog"], {"object_swap": 4.0})
    assert torch.equal(w, torch.tensor([4.0, 0.0, 1.0]))  # lambda = 0 stays 0; an unnamed task keeps 1


def test_word_encoder_spells_indicators_as_the_packer_reads_them():
    """``{IMAGE9}`` names no image for the packer (case-sensitive) and must not become the ``{image9}`` word;
    ``{image01}`` is ``{image1}`` to the packer and must be that word too (not a new random vector)."""
    from omniace.engine.lcu import indicator_indices
    from omniace.engine.text import WordTextEncoder

    enc = WordTextEncoder(8, max_len=16)
    assert enc.words("{IMAGE9} fix") == ["{", "image9", "}", "fix"] and indicator_indices("{IMAGE9} fix") == []
    assert enc.words("{image01}{image0} put {Image} in a{image2}b") == \
        ["{image1}", "{image}", "put", "{", "image", "}", "in", "a", "{image2}", "b"]
    assert [i for _, i in indicator_indices("{image01}{image0}")] == [1, 0]
    a, b = enc.encode(["{image01} red", "{image1} red"])
    assert torch.equal(a.tokens, b.tokens)
    assert enc.words("élan 红 🙂 ") == ["é", "lan", "红", "🙂"] and enc.encode(["  "])[0].tokens.shape == (1, 8)


def test_a_latent_cache_takes_the_word_encoders_text_states():
    """``--text-encoder tiny:ace-edit`` stopped with AttributeError: the word encoder had no ``pooled_dim``."""
    from omniace.train.cache import CacheConfig, open_text_encoder

    for preset in ("ace-edit", "ace-small"):
        cfg = CacheConfig(data=["x"], vae="pixel", out="unused", text_encoder=f"tiny:{preset}")
        info = open_text_encoder(cfg, torch.device("cpu"))[1]
        assert info == {"encoder": f"tiny:{preset}", "family": "ace", "dim": 32, "pooled_dim": None}


# the per-pixel head (cfg.pixel_head) on a pixel codec of factor 2: 12 latent channels, 16 pixels per token
F2, K = 2, 5


def _pixel_model(gate: bool = True, smooth: int = 0, keys: int = 0, sigma_data: float = 0.0, conv: int = 0):
    cfg = get_config("ace-tiny", in_channels=3 * F2 * F2, codec_factor=F2, y_channels=Y, prediction="x0",
                     source_skip=True, source_gate=gate, pixel_head=K, pixel_smooth=smooth, pixel_keys=keys,
                     pixel_sigma_data=sigma_data, pixel_conv=conv)
    return build_model(cfg)


def _pixel_samples(seed: int):
    """The gate tests' samples with RGB images encoded by the pixel codec (odd token grids)."""
    from omniace.engine.codec import PixelCodec

    codec = PixelCodec(F2)
    up = lambda v: F.interpolate(v[None], scale_factor=F2)[0]
    enc = lambda im: ImageInput(codec.encode(up(im.latent)), im.mask)  # the mask is per latent cell
    out = []
    for s in _samples(seed):
        units = [ConditionUnit(u.instruction, [enc(i) for i in u.images], text=u.text) for u in s.units]
        out.append(LCUSample(units, enc(s.target)))
    return out


def test_pixel_head_rgb_columns_are_one_pixel():
    """The head reads a token row as ``[3, pixels]``: column j must be the R, G and B of one image pixel."""
    from omniace.engine.codec import PixelCodec

    h, w = 6 * F2, 10 * F2
    ids = torch.arange(h * w, dtype=torch.float32).view(1, h, w).expand(3, h, w).clone()
    ids[1] += 0.25
    ids[2] += 0.5  # same pixel id, told apart by channel
    rows = pack([LCUSample([ConditionUnit("", [], text=torch.zeros(1, Y))],
                           ImageInput(F.pixel_unshuffle(ids[None], F2)[0]))], P, with_mask=True).target_tokens()
    cols = rows.view(rows.shape[0], 3, -1)
    assert torch.equal(cols[:, 1] - cols[:, 0], torch.full_like(cols[:, 0], 0.25))
    assert torch.equal(cols[:, 2] - cols[:, 0], torch.full_like(cols[:, 0], 0.5))
    assert cols[:, 0].flatten().unique().numel() == h * w  # every pixel once
    assert PixelCodec(F2).latent_channels * P * P == rows.shape[1]


def test_untrained_pixel_head_copies_the_source():
    for gate in (False, True):
        model = _pixel_model(gate).eval()
        batch = pack(_pixel_samples(1), P, with_mask=True)
        x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P)
        with torch.no_grad():
            out = model(batch, x, torch.tensor([5, 500, 999, 10]))
        idx = batch.source_index
        has = idx >= 0
        assert torch.equal(out[has], batch.tokens[idx[has], :out.shape[1]])
        assert torch.equal(out[~has], torch.zeros_like(out[~has]))


def _head_inputs_and_output(model, samples_seed: int, dtype):
    """Run ``model`` in ``dtype`` on the pixel samples; returns (batch, x, output, final linear's output), fp32."""
    batch = pack(_pixel_samples(samples_seed), P, with_mask=True).to("cpu", dtype)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P).to(dtype)
    seen = {}
    handle = model.final_layer.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        out = model(batch, x, torch.tensor([3, 400, 999, 77])).float()
    handle.remove()
    return batch, x.float(), out, seen["o"].float()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("gate", [False, True])
def test_pixel_head_matches_a_per_pixel_loop(dtype, tol, gate):
    """Reference: one pixel at a time, [features, source RGB, noisy RGB] -> MLP -> change (and gate)."""
    model = randomise(_pixel_model(gate), seed=6, std=0.2).to(dtype).eval()
    batch, xf, out, feat = _head_inputs_and_output(model, 2, dtype)
    ph = {k: v.float() for k, v in model.pixel_head.state_dict().items()}
    idx = batch.source_index
    c = xf.shape[1]
    n_pix = c // 3
    ref = torch.empty_like(out)
    for r in range(out.shape[0]):
        src = batch.tokens[idx[r], :c].float() if idx[r] >= 0 else torch.zeros(c)
        for j in range(n_pix):
            v = torch.cat([feat[r, j * K:(j + 1) * K], src[j::n_pix], xf[r, j::n_pix]])
            o = ph["fc2.weight"] @ F.silu(ph["fc1.weight"] @ v + ph["fc1.bias"]) + ph["fc2.bias"]
            change = o[:3] * (torch.sigmoid(o[3:]) if gate and idx[r] >= 0 else 1)
            ref[r, j::n_pix] = src[j::n_pix] + change
    err = (out - ref).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err
    assert (out - torch.cat([batch.tokens[idx.clamp(min=0), :c].float()])).abs().max() > 0.1  # not a copy


def test_pixel_head_gradients_and_settings():
    model = randomise(_pixel_model(True), seed=7, std=0.1)
    batch = pack(_pixel_samples(3), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P)
    model(batch, x, torch.tensor([1, 2, 3, 4])).pow(2).sum().backward()
    for p in (model.final_layer.linear.weight, model.pixel_head.fc1.weight, model.pixel_head.fc2.weight,
              model.x_embedder.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pixel_head reads each pixel's source value: it needs source_skip=True"):
        get_config("ace-tiny", in_channels=12, codec_factor=2, prediction="x0", pixel_head=4)
    with pytest.raises(ValueError, match=r"in_channels = 3 \* codec_factor\*\*2 = 48"):
        get_config("ace-tiny", in_channels=16, codec_factor=4, prediction="x0", source_skip=True, pixel_head=4)
    for bad in (-1, 2.5, "16", None, True):
        with pytest.raises(ValueError, match=f"pixel_head must be an integer >= 0 \\(0 = off\\), got {bad!r}"):
            get_config("ace-tiny", pixel_head=bad)


# the smooth features of the per-pixel head (cfg.pixel_smooth): per-token values upsampled bilinearly
S = 3


def test_target_neighbors_are_each_target_tokens_3x3_neighbourhood():
    """Reference: a loop over every target frame's grid, clamping at the border, rows counted within the targets."""
    batch = pack(_pixel_samples(4), P, with_mask=True)
    want, row0 = [], 0
    for h, w in batch.target_sizes:
        gh, gw = h // P, w // P
        for r in range(gh):
            for c in range(gw):
                want.append([row0 + min(max(r + dy, 0), gh - 1) * gw + min(max(c + dx, 0), gw - 1)
                             for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        row0 += gh * gw
    assert batch.target_neighbors.dtype == torch.int64
    assert torch.equal(batch.target_neighbors, torch.tensor(want))
    assert row0 == batch.target_index.numel()


def _smooth_reference(batch, feat, n_pix: int) -> torch.Tensor:
    """``[L_tgt, S, n_pix]``: each sample's smooth columns of the final linear's output ``feat`` as a
    ``[S, gh, gw]`` map, ``F.interpolate`` bilinear (align_corners=False) to pixels in fp32, laid out as the codec
    lays out pixels (space-to-depth then patchify)."""
    smooth = []
    for (h, w), a, b in zip(batch.target_sizes, batch.cu_seqlens_target()[:-1], batch.cu_seqlens_target()[1:]):
        grid = feat[a:b, n_pix * K:n_pix * K + S].T.reshape(1, S, h // P, w // P)
        smooth.append(pack_pixels(F.interpolate(grid, scale_factor=F2 * P, mode="bilinear", align_corners=False)[0]))
    return torch.cat(smooth).view(-1, S, n_pix)


def _gated_pixel_loop(model, batch, feat, xf, extra) -> torch.Tensor:
    """The gated per-pixel head one pixel at a time, in fp32: [features, *extra(row, pixel), source RGB, noisy RGB]
    -> MLP -> source + sigmoid(gate) * change (gate 1 where the sample has no source, whose source is zeros)."""
    ph = {k: v.float() for k, v in model.pixel_head.state_dict().items()}
    idx, c = batch.source_index, xf.shape[1]
    n_pix = c // 3
    ref = torch.empty_like(xf)
    for r in range(xf.shape[0]):
        src = batch.tokens[idx[r], :c].float() if idx[r] >= 0 else torch.zeros(c)
        for j in range(n_pix):
            v = torch.cat([feat[r, j * K:(j + 1) * K], *extra(r, j), src[j::n_pix], xf[r, j::n_pix]])
            o = ph["fc2.weight"] @ F.silu(ph["fc1.weight"] @ v + ph["fc1.bias"]) + ph["fc2.bias"]
            ref[r, j::n_pix] = src[j::n_pix] + o[:3] * (torch.sigmoid(o[3:]) if idx[r] >= 0 else 1)
    return ref


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_smooth_head_matches_bilinear_interpolate_then_a_per_pixel_loop(dtype, tol):
    """Reference: each sample's smooth columns as a [S, gh, gw] map, ``F.interpolate`` bilinear
    (align_corners=False) to pixels in fp32, laid out as the codec lays out pixels; then one pixel at a time,
    [features, smooth, source RGB, noisy RGB] -> MLP -> gated change. Odd grids, a sample with no source."""
    model = randomise(_pixel_model(smooth=S), seed=9, std=0.2).to(dtype).eval()
    batch, xf, out, feat = _head_inputs_and_output(model, 5, dtype)
    c = xf.shape[1]
    n_pix = c // 3
    smooth = _smooth_reference(batch, feat, n_pix)
    ref = _gated_pixel_loop(model, batch, feat, xf, lambda r, j: [smooth[r, :, j]])
    err = (out - ref).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err
    # the reference can tell: nearest-neighbour upsampling (each pixel its own token's value) is far from it
    own = feat[:, n_pix * K:, None].expand(-1, S, n_pix)
    assert (own - smooth).abs().max() > 0.1


def pack_pixels(image: torch.Tensor) -> torch.Tensor:
    """``[ch, H, W]`` -> ``[L, ch * pixels]`` token rows, laid out as the pixel codec and patchify lay out an image."""
    from omniace.engine.lcu import patchify

    return patchify(F.pixel_unshuffle(image[None], F2)[0], P)


def _backward_to_extra_rows(model, samples_seed: int):
    """A backward through ``model`` on the pixel samples; returns (batch, x, the gradient of the final linear's
    rows past the per-pixel features: the smooth features' and key colours')."""
    batch = pack(_pixel_samples(samples_seed), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P)
    model(batch, x, torch.tensor([1, 2, 3, 4])).pow(2).sum().backward()
    return batch, x, model.final_layer.linear.weight.grad[F2 * F2 * P * P * K:]


def test_smooth_head_gradients_flops_memory_and_settings():
    from omniace.engine.memory import estimate_memory

    model = randomise(_pixel_model(smooth=S), seed=10, std=0.1)
    batch, x, smooth_rows = _backward_to_extra_rows(model, 6)
    n_pix = F2 * F2 * P * P
    assert smooth_rows.shape[0] == S and smooth_rows.abs().sum(1).min() > 0
    plain = _pixel_model(True)
    # the final linear's S more outputs, fc1's S more inputs, the 9-tap upsampling
    more = 2 * 12 * model.cfg.hidden_size * S + 2 * 12 * n_pix * (S * 2 * K + 9 * S)
    assert model.flops([[12]], [[7]]) - plain.flops([[12]], [[7]]) == more
    grow = estimate_memory(model, 64, 8, 1, 4096).activations - estimate_memory(plain, 64, 8, 1, 4096).activations
    assert grow == 4096 * 2 * S * 4
    batch.target_neighbors = None
    with pytest.raises(ValueError, match="needs target_neighbors"):
        model(batch, x, torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="pixel_smooth feeds the per-pixel head: it needs pixel_head > 0"):
        get_config("ace-tiny", pixel_smooth=4)
    for bad in (-1, 2.5, "16", None, True):
        with pytest.raises(ValueError, match=f"pixel_smooth must be an integer >= 0 \\(0 = off\\), got {bad!r}"):
            get_config("ace-tiny", pixel_smooth=bad)


# the text refiner (cfg.text_refiner): transformer layers over each frame's text before the blocks
def test_an_untrained_text_refiner_is_the_identity():
    torch.manual_seed(8)
    plain = randomise(_gate_model(), seed=8, std=0.1).eval()
    refined = _gate_model(text_refiner=2).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("text_refiner.") for k in missing)
    batch = pack(_samples(4), P, with_mask=True)
    x, t = torch.randn(batch.target_index.numel(), C * P * P), torch.tensor([9, 300, 999, 42])
    with torch.no_grad():
        assert torch.equal(plain(batch, x, t), refined(batch, x, t))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_text_refiner_matches_one_frame_at_a_time(dtype, tol):
    """Reference: each frame's text alone through LayerNorm -> softmax attention -> LayerNorm -> MLP, in fp32;
    the packed layers must not mix two frames' texts (odd text lengths 3-7, one sample with two frames per unit)."""
    model = randomise(_gate_model(text_refiner=2), seed=9, std=0.2).to(dtype).eval()
    batch = pack(_samples(5), P, with_mask=True).to("cpu", dtype)
    y0 = model.y_embedder(batch.text).index_select(0, batch.frame_text_index)
    with torch.no_grad():
        y = y0
        for layer in model.text_refiner:
            y = layer(y, batch.cu_seqlens_frame_txt, batch.max_seqlen_frame_txt)
    heads = model.cfg.num_heads
    sd = [{k: v.float() for k, v in layer.state_dict().items()} for layer in model.text_refiner]
    lin = lambda w, name, v: v @ w[f"{name}.weight"].T + w[f"{name}.bias"]
    rms = lambda w, name, v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w[f"{name}.weight"]
    cu = batch.cu_seqlens_frame_txt.tolist()
    assert len(set(b - a for a, b in zip(cu, cu[1:]))) > 2  # segments of several lengths
    ref = torch.empty_like(y, dtype=torch.float32)
    for a, b in zip(cu, cu[1:]):
        v = y0[a:b].float().detach()
        for w in sd:
            h = F.layer_norm(v, v.shape[-1:], eps=1e-6)
            q, k = rms(w, "attn.norm_q", lin(w, "attn.q", h)), rms(w, "attn.norm_k", lin(w, "attn.k", h))
            vv = lin(w, "attn.v", h)
            split = lambda z: z.view(z.shape[0], heads, -1).transpose(0, 1)
            s = split(q) @ split(k).transpose(1, 2) / (q.shape[-1] // heads) ** 0.5
            a_out = (s.softmax(-1) @ split(vv)).transpose(0, 1).flatten(1)
            v = v + lin(w, "attn.o", a_out)
            h2 = F.layer_norm(v, v.shape[-1:], eps=1e-6)
            v = v + lin(w, "mlp.fc2", F.gelu(lin(w, "mlp.fc1", h2), approximate="tanh"))
        ref[a:b] = v
    err = (y.float() - ref).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err
    assert (ref - y0.float()).abs().max() > 0.1  # the layers did something


def test_text_refiner_gradients_flops_and_settings():
    model = randomise(_gate_model(text_refiner=1), seed=10, std=0.1)
    batch = pack(_samples(6), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), C * P * P)
    model(batch, x, torch.tensor([1, 2, 3, 4])).pow(2).sum().backward()
    layer = model.text_refiner[0]
    for p in (layer.attn.q.weight, layer.attn.k.weight, layer.attn.v.weight, layer.attn.o.weight,
              layer.mlp.fc1.weight, layer.mlp.fc2.weight, model.y_embedder.fc1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # FLOPs: one layer over T text tokens in one frame adds 2 (4 T d^2 + 2 T^2 d + 2 T d * mlp hidden)
    d, hid = model.cfg.hidden_size, int(model.cfg.hidden_size * model.cfg.mlp_ratio)
    plain = _gate_model()
    assert model.flops([[12]], [[7]]) - plain.flops([[12]], [[7]]) == 2 * (4 * 7 * d * d + 2 * 49 * d + 2 * 7 * d * hid)
    with pytest.raises(ValueError, match="one count per frame of each sample"):
        model.flops([[12, 4]], [[7]])
    with pytest.raises(ValueError, match="must be >= 0"):
        model.flops([[12]], [[-1]])
    for bad in (-1, 1.5, "2", None, True):
        with pytest.raises(ValueError, match=f"text_refiner must be an integer >= 0 \\(layers; 0 = off\\), got {bad!r}"):
            get_config("ace-tiny", text_refiner=bad)


# the key colours of the per-pixel head (cfg.pixel_keys): per-token colours matched against each source pixel
Q = 2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_key_head_matches_a_per_pixel_loop(dtype, tol):
    """Reference: one pixel at a time, each key's match ``1 / (1 + |source - key|^2 / w)`` written out, then
    [features, smooth, matches, source RGB, noisy RGB] -> MLP -> gated change. Odd grids, a sample with no source
    (its source is zeros). The smooth features come from the smooth head's reference, checked above."""
    model = randomise(_pixel_model(smooth=S, keys=Q), seed=11, std=0.2)
    # key 0 of every token: one source pixel's colour (so some pixels match it exactly); key 1 stays random
    first = pack(_pixel_samples(7), P, with_mask=True)
    pixel = first.tokens[first.source_index.max(), :3 * F2 * F2 * P * P].view(3, -1)[:, 5]
    rows = slice(F2 * F2 * P * P * K + S, F2 * F2 * P * P * K + S + 3)
    with torch.no_grad():
        model.final_layer.linear.weight[rows] = 0
        model.final_layer.linear.bias[rows] = pixel
    model = model.to(dtype).eval()
    batch, xf, out, feat = _head_inputs_and_output(model, 7, dtype)
    c = xf.shape[1]
    n_pix = c // 3
    smooth = _smooth_reference(batch, feat, n_pix)
    ph = {k: v.float() for k, v in model.pixel_head.state_dict().items()}
    width = model.pixel_head.KEY_WIDTH
    idx = batch.source_index
    ref = torch.empty_like(out)
    matches = []
    for r in range(out.shape[0]):
        src = batch.tokens[idx[r], :c].float() if idx[r] >= 0 else torch.zeros(c)
        keys = feat[r, n_pix * K + S:]
        for j in range(n_pix):
            pixel = src[j::n_pix]
            match = torch.stack([1 / (1 + ((pixel - keys[3 * q:3 * q + 3]) ** 2).sum() / width) for q in range(Q)])
            matches.append(match)
            v = torch.cat([feat[r, j * K:(j + 1) * K], smooth[r, :, j], match, pixel, xf[r, j::n_pix]])
            o = ph["fc2.weight"] @ F.silu(ph["fc1.weight"] @ v + ph["fc1.bias"]) + ph["fc2.bias"]
            ref[r, j::n_pix] = pixel + o[:3] * (torch.sigmoid(o[3:]) if idx[r] >= 0 else 1)
    err = (out - ref).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err
    matches = torch.stack(matches)
    assert matches[:, 1].max() < 0.5 and matches[:, 0].max() > 0.9 and matches[:, 0].min() < 0.2


def test_key_head_gradients_flops_memory_and_settings():
    from omniace.engine.memory import estimate_memory

    model = randomise(_pixel_model(keys=Q), seed=12, std=0.1)
    key_rows = _backward_to_extra_rows(model, 8)[2]
    n_pix = F2 * F2 * P * P
    assert key_rows.shape[0] == 3 * Q and key_rows.abs().sum(1).min() > 0
    assert model.pixel_head.fc1.in_features == K + Q + 6
    plain = _pixel_model(True)
    # the final linear's 3Q more outputs, fc1's Q more inputs, each key's distance and match (12 FLOPs)
    more = 2 * 12 * model.cfg.hidden_size * 3 * Q + 2 * 12 * n_pix * (Q * 2 * K + 6 * Q)
    assert model.flops([[12]], [[7]]) - plain.flops([[12]], [[7]]) == more
    grow = estimate_memory(model, 64, 8, 1, 4096).activations - estimate_memory(plain, 64, 8, 1, 4096).activations
    assert grow == 4096 * 3 * Q * 4
    with pytest.raises(ValueError, match="pixel_keys feeds the per-pixel head: it needs pixel_head > 0"):
        get_config("ace-tiny", pixel_keys=4)
    with pytest.raises(ValueError, match=r"preset 'sd3-tiny-editnet' \(SD3Config\) has no field 'pixel_keys'; its "
                                         r"fields: family, sample_size"):
        get_config("sd3-tiny-editnet", pixel_keys=4)
    for bad in (-1, 2.5, "16", None, True):
        with pytest.raises(ValueError, match=f"pixel_keys must be an integer >= 0 \\(0 = off\\), got {bad!r}"):
            get_config("ace-tiny", pixel_keys=bad)


# the Wiener estimate in the per-pixel head (cfg.pixel_sigma_data): c(t) (x_t - alpha_t source) per pixel
SD = 0.5


def _wiener_gain(t: int, sigma_data: float) -> tuple[float, float]:
    """(c(t), alpha_t) from the DDPM linear betas 1e-4..0.02 written out in float64 (ACE's schedule)."""
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    acp = 1.0
    for b in betas[:t + 1]:
        acp *= 1 - b
    alpha, sigma2 = acp ** 0.5, 1 - acp
    return alpha * sigma_data**2 / (alpha**2 * sigma_data**2 + sigma2), alpha


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_wiener_head_matches_a_per_pixel_loop(dtype, tol):
    """Reference: one pixel at a time, its sample's timestep (3, 400, 999, 77: each token must read its own
    sample's), c(t) and alpha_t from the schedule written out, then [features, smooth, c (x - alpha src), source
    RGB, noisy RGB] -> MLP -> gated change. Odd grids, a sample with no source (its source is zeros)."""
    model = randomise(_pixel_model(smooth=S, sigma_data=SD), seed=13, std=0.2).to(dtype).eval()
    batch, xf, out, feat = _head_inputs_and_output(model, 8, dtype)
    c = xf.shape[1]
    n_pix = c // 3
    smooth = _smooth_reference(batch, feat, n_pix)
    ph = {k: v.float() for k, v in model.pixel_head.state_dict().items()}
    idx, sample = batch.source_index, batch.sample_of_token[batch.target_index]
    ts = [3, 400, 999, 77]
    ref = torch.empty_like(out)
    for r in range(out.shape[0]):
        gain, alpha = _wiener_gain(ts[sample[r]], SD)
        src = batch.tokens[idx[r], :c].float() if idx[r] >= 0 else torch.zeros(c)
        for j in range(n_pix):
            pixel, noisy = src[j::n_pix], xf[r, j::n_pix]
            v = torch.cat([feat[r, j * K:(j + 1) * K], smooth[r, :, j], gain * (noisy - alpha * pixel), pixel, noisy])
            o = ph["fc2.weight"] @ F.silu(ph["fc1.weight"] @ v + ph["fc1.bias"]) + ph["fc2.bias"]
            ref[r, j::n_pix] = pixel + o[:3] * (torch.sigmoid(o[3:]) if idx[r] >= 0 else 1)
    err = (out - ref).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err
    # the reference can tell: the same weights without the Wiener input's timestep (t = 999 everywhere) differ
    plain = model.pixel_head.wiener[999].float()
    assert (model.pixel_head.wiener[3].float() - plain).abs().min() > 0.9


def test_wiener_head_can_return_its_noisy_input_at_low_noise():
    """Why the input exists: with fc1/fc2 set to pass the Wiener channels through (silu(z) - silu(-z) = z) and
    the gate saturated, the head returns source + c(t) (x - alpha source), which is x at t = 0 (c, alpha ~ 1): a
    clean target survives the head exactly, with no product of timestep and pixel for the MLP to learn. At t =
    999 the same weights return the source (c ~ 0.002)."""
    model = _pixel_model(sigma_data=SD).eval()
    ph = model.pixel_head
    with torch.no_grad():
        for lin in (ph.fc1, ph.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        for ch in range(3):  # hidden 2ch, 2ch+1 = +-(Wiener channel ch), which sits after the K features
            ph.fc1.weight[2 * ch, K + ch] = 1.0
            ph.fc1.weight[2 * ch + 1, K + ch] = -1.0
            ph.fc2.weight[ch, 2 * ch] = 1.0
            ph.fc2.weight[ch, 2 * ch + 1] = -1.0
        ph.fc2.bias[3:] = 40.0  # sigmoid(40) = 1 in fp32
    batch = pack(_pixel_samples(9), P, with_mask=True)
    x = torch.rand(batch.target_index.numel(), 3 * F2 * F2 * P * P) * 2 - 1
    src, has = model.source_tokens(batch, x.shape[1])
    for t, want in ((0, x), (999, None)):
        with torch.no_grad():
            out = model(batch, x, torch.full((batch.num_samples,), t))
        gain, alpha = _wiener_gain(t, SD)
        assert torch.allclose(out, src + gain * (x - alpha * src), atol=1e-5)
        if want is not None:
            assert (out - want).abs().max() < 2e-3  # c(0) = 0.9996 (sigma_0 = 0.01), alpha_0 = 0.99995; |x - src| <= 2
    assert (out - src).abs().max() < 0.01


def test_wiener_head_gradients_flops_memory_and_settings():
    from omniace.engine.memory import estimate_memory

    model = randomise(_pixel_model(sigma_data=SD), seed=14, std=0.1)
    batch = pack(_pixel_samples(3), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P, requires_grad=True)
    model(batch, x, torch.tensor([1, 200, 3, 900])).pow(2).sum().backward()
    wiener_cols = model.pixel_head.fc1.weight.grad[:, K:K + 3]
    assert model.pixel_head.fc1.in_features == K + 3 + 6 and wiener_cols.abs().sum(0).min() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert "wiener" not in model.state_dict()  # it follows from the schedule: old weights files still load
    with torch.device("meta"):  # where the checkpoint export and EditPipeline.dry build models (it raised there)
        on_meta = _pixel_model(sigma_data=SD)
        sampler = DDIMSampler(steps=10, timestep_spacing="sigma")
    assert on_meta.pixel_head.wiener.is_meta and on_meta.pixel_head.wiener.shape == (1000, 2)
    assert sampler.timesteps().tolist() == [999, 391, 301, 239, 189, 145, 106, 68, 33, 0]
    plain = _pixel_model(True)
    n_pix = F2 * F2 * P * P
    # fc1's 3 more inputs (x 2K hidden), the estimate's multiply-add per channel (6 FLOPs per pixel)
    assert model.flops([[12]], [[7]]) - plain.flops([[12]], [[7]]) == 2 * 12 * n_pix * (3 * 2 * K + 6)
    grow = estimate_memory(model, 64, 8, 1, 4096).activations - estimate_memory(plain, 64, 8, 1, 4096).activations
    assert grow == 4096 * 3 * 4
    with pytest.raises(ValueError, match="pixel_sigma_data reads each target token's timestep"):
        model.pixel_head(torch.zeros(2, n_pix * K), torch.zeros(2, 3 * n_pix), torch.zeros(2, 3 * n_pix),
                         torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="pixel_sigma_data feeds the per-pixel head: it needs pixel_head > 0"):
        get_config("ace-tiny", pixel_sigma_data=0.5)
    for bad in (-0.5, float("nan"), float("inf"), "0.5", None, True):
        with pytest.raises(ValueError, match=f"pixel_sigma_data must be a finite number >= 0 \\(0 = off\\), got "
                                             f"{re.escape(repr(bad))}"):
            get_config("ace-edit", pixel_sigma_data=bad)


# the convolution over each pixel's neighbourhood (cfg.pixel_conv)
CV = 4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_conv_features_match_conv2d_over_each_whole_image(dtype, tol):
    """Reference: each frame as a whole [noisy RGB, source RGB, ones] image, ``F.conv2d`` with zero padding in
    fp32, laid out as the codec lays out pixels. Odd grids (tokens of 4 pixels, a 5x5 kernel reaching 2 pixels
    into the neighbours): 3x5, 1x4 and 2x1 tokens, a 1x1 frame, one frame with no source (zeros). Tolerance
    relative to the largest output: fp32 1e-5, bf16 3e-2, fp16 5e-3."""
    from omniace.engine.lcu import grid_neighbors

    head = randomise(_pixel_model(conv=CV), seed=21, std=0.3).pixel_head.to(dtype)
    size = F2 * P
    g = torch.Generator().manual_seed(4)
    xs, srcs, nbrs, refs, row0 = [], [], [], [], 0
    for (gh, gw), has_source in (((3, 5), True), ((1, 4), True), ((2, 1), False), ((1, 1), True)):
        noisy = torch.randn(3, gh * size, gw * size, generator=g).to(dtype).float()
        src = (torch.rand(3, gh * size, gw * size, generator=g) * 2 - 1).to(dtype).float() * has_source
        planes = torch.cat([noisy, src, torch.ones(1, gh * size, gw * size)])
        w = head.conv2d.weight.float()
        ref = F.conv2d(planes[None], w, head.conv2d.bias.float(), padding=head.CONV_KERNEL // 2)[0]
        xs.append(pack_pixels(noisy))
        srcs.append(pack_pixels(src))
        refs.append(pack_pixels(ref).view(-1, CV, size * size).transpose(1, 2))
        nbrs.append(grid_neighbors(gh, gw) + row0)
        row0 += gh * gw
    with torch.no_grad():
        out = head.conv_features(torch.cat(xs).to(dtype), torch.cat(srcs).to(dtype), torch.cat(nbrs)).float()
    ref = torch.cat(refs)
    assert out.shape == ref.shape == (row0, size * size, CV)
    err = (out - ref).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err
    # the reference can tell: a conv that wraps inside each token (no neighbours) is far from it
    alone = torch.arange(row0)[:, None].expand(-1, 9)
    with torch.no_grad():
        wrapped = head.conv_features(torch.cat(xs).to(dtype), torch.cat(srcs).to(dtype), alone).float()
    assert (wrapped - ref).abs().max() > 0.5


def test_conv_head_feeds_the_mlp_gradients_flops_memory_and_settings():
    from omniace.engine.memory import estimate_memory

    model = randomise(_pixel_model(smooth=S, conv=CV), seed=22, std=0.1)
    batch = pack(_pixel_samples(3), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P, requires_grad=True)
    model(batch, x, torch.tensor([1, 200, 3, 900])).pow(2).sum().backward()
    ph = model.pixel_head
    conv_cols = ph.fc1.weight.grad[:, K + S:K + S + CV]  # after the per-pixel and smooth features
    assert ph.fc1.in_features == K + S + CV + 6 and conv_cols.abs().sum(0).min() > 0
    assert ph.conv2d.weight.grad.abs().sum((1, 2, 3)).min() > 0 and x.grad.abs().sum() > 0
    # the head reads the features at those columns: zeroing them moves the output
    with torch.no_grad():
        before = model(batch, x, torch.tensor([1, 200, 3, 900]))
        ph.conv2d.bias.add_(1.0)
        assert (model(batch, x, torch.tensor([1, 200, 3, 900])) - before).abs().max() > 1e-3
    plain = _pixel_model(smooth=S)
    n_pix = F2 * F2 * P * P
    # fc1's CV more inputs (x 2K hidden), the convolution's 7 x 5 x 5 MACs per output channel and pixel
    assert model.flops([[12]], [[7]]) - plain.flops([[12]], [[7]]) == 2 * 12 * n_pix * (CV * 2 * K + CV * 7 * 25)
    grow = estimate_memory(model, 64, 8, 1, 4096).activations - estimate_memory(plain, 64, 8, 1, 4096).activations
    assert grow == 4096 * (2 * CV + 42) * 4
    batch.target_neighbors = None
    with pytest.raises(ValueError, match="pixel_conv reads each target token's grid neighbours"):
        _pixel_model(conv=CV)(batch, x, torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="pixel_conv feeds the per-pixel head: it needs pixel_head > 0"):
        get_config("ace-tiny", pixel_conv=4)
    for bad in (-1, 2.5, "16", None, True):
        with pytest.raises(ValueError, match=f"pixel_conv must be an integer >= 0 \\(0 = off\\), got {bad!r}"):
            get_config("ace-edit", pixel_conv=bad)
    with pytest.raises(ValueError, match="reaches past the 3x3 token neighbourhood of 1-pixel tokens"):
        build_model(get_config("ace-tiny", in_channels=3, codec_factor=1, patch_size=1, prediction="x0",
                               source_skip=True, pixel_head=2, pixel_conv=2))


# self-conditioning (cfg.self_condition, Analog Bits): the previous x0 estimate, in the embedding and the pixel head
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_self_condition_adds_the_embedded_previous_estimate_to_each_target_token(dtype, tol):
    """Reference: the first block's input of the same weights without ``self_condition``, plus the embedding of
    each target token's row of ``x0_prev`` (a loop over the target rows); condition and history rows unchanged.
    With ``x0_prev`` None (zeros) the model is exactly the one without it."""
    sc = randomise(_gate_model(source_gate=True, self_condition=True), seed=31, std=0.1).to(dtype).eval()
    plain = _gate_model(source_gate=True)
    plain.load_state_dict({k: v for k, v in sc.state_dict().items() if not k.startswith("self_cond_embedder")})
    plain = plain.to(dtype).eval()
    batch = pack(_samples(12), P, with_mask=True).to("cpu", dtype)
    g = torch.Generator().manual_seed(32)
    x = torch.randn(batch.target_index.numel(), C * P * P, generator=g).to(dtype)
    prev = torch.randn(x.shape, generator=g).to(dtype)
    t = torch.tensor([3, 400, 999, 77])
    seen = []
    for model, kw in ((sc, {"x0_prev": prev}), (plain, {})):
        handle = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].float()))
        with torch.no_grad():
            model(batch, x, t, **kw)
        handle.remove()
    w = sc.self_cond_embedder.weight.float()
    ref = seen[1].clone()
    for row, tok in enumerate(batch.target_index.tolist()):
        ref[tok] += w @ prev[row].float()
    assert (seen[0] - ref).abs().max() < tol * max(1.0, ref.abs().max().item())
    moved = (seen[0] - seen[1]).abs().amax(1) > 0
    assert moved[batch.target_index].all() and not moved[~batch.is_target].any()
    with torch.no_grad():  # no estimate yet (a request's first step): exactly the model without the input
        assert torch.equal(sc(batch, x, t), plain(batch, x, t))
        assert (sc(batch, x, t, x0_prev=prev) - sc(batch, x, t)).abs().max() > 0.05


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_self_conditioned_pixel_head_matches_a_per_pixel_loop(dtype, tol):
    """Reference: one pixel at a time, [features, smooth, previous estimate RGB, source RGB, noisy RGB] -> MLP ->
    gated change; odd grids, a sample with no source."""
    cfg = get_config("ace-tiny", in_channels=3 * F2 * F2, codec_factor=F2, y_channels=Y, prediction="x0",
                     source_skip=True, source_gate=True, pixel_head=K, pixel_smooth=S, self_condition=True)
    model = randomise(build_model(cfg), seed=33, std=0.2).to(dtype).eval()
    batch = pack(_pixel_samples(13), P, with_mask=True).to("cpu", dtype)
    g = torch.Generator().manual_seed(34)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P, generator=g).to(dtype)
    prev = torch.randn(x.shape, generator=g).to(dtype)
    seen = {}
    handle = model.final_layer.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        out = model(batch, x, torch.tensor([3, 400, 999, 77]), x0_prev=prev).float()
    handle.remove()
    feat, xf, pf = seen["o"].float(), x.float(), prev.float()
    c = xf.shape[1]
    n_pix = c // 3
    smooth = _smooth_reference(batch, feat, n_pix)
    ref = _gated_pixel_loop(model, batch, feat, xf, lambda r, j: [smooth[r, :, j], pf[r, j::n_pix]])
    err = (out - ref).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err


def test_self_condition_gradients_flops_memory_and_settings():
    from omniace.engine.memory import estimate_memory

    cfg = get_config("ace-tiny", in_channels=3 * F2 * F2, codec_factor=F2, y_channels=Y, prediction="x0",
                     source_skip=True, source_gate=True, pixel_head=K, self_condition=True)
    model = randomise(build_model(cfg), seed=35, std=0.1)
    batch = pack(_pixel_samples(3), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P)
    prev = torch.randn(x.shape, requires_grad=True)
    model(batch, x, torch.tensor([1, 200, 3, 900]), x0_prev=prev).pow(2).sum().backward()
    ph = model.pixel_head
    assert ph.fc1.in_features == K + 3 + 6 and ph.fc1.weight.grad[:, K:K + 3].abs().sum(0).min() > 0
    assert model.self_cond_embedder.weight.grad.abs().sum() > 0 and prev.grad.abs().sum() > 0
    plain = _pixel_model(True)
    n_pix, c_lat, d = F2 * F2 * P * P, 3 * F2 * F2 * P * P, model.cfg.hidden_size
    # the estimate's embedding (12 target tokens x c_lat -> d) and fc1's 3 more inputs per pixel (x 2K hidden)
    assert model.flops([[12]], [[7]]) - plain.flops([[12]], [[7]]) == 2 * 12 * (c_lat * d + n_pix * 3 * 2 * K)
    grow = estimate_memory(model, 64, 8, 1, 4096).activations - estimate_memory(plain, 64, 8, 1, 4096).activations
    assert grow == 4096 * 6 * 4
    with pytest.raises(ValueError, match=r"x0_prev must be shaped like x, \(.*\), got \(3, 5\)"):
        model(batch, x, torch.tensor([1, 2, 3, 4]), x0_prev=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="x0_prev is the self-conditioning input: this model has self_condition=False"):
        plain(batch, x, torch.tensor([1, 2, 3, 4]), x0_prev=torch.zeros_like(x))
    with pytest.raises(ValueError, match="self_condition reads the previous x0 estimate: pass x0_prev"):
        ph(torch.zeros(2, n_pix * K), torch.zeros(2, 3 * n_pix), torch.zeros(2, 3 * n_pix),
           torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="self_condition feeds the model its previous x0 estimate: it needs "
                                         "prediction='x0', got 'eps'"):
        get_config("ace-tiny", self_condition=True)
    for bad in (1, "true", None):
        with pytest.raises(ValueError, match=f"self_condition must be True or False, got {re.escape(repr(bad))}"):
            get_config("ace-edit", self_condition=bad)
    assert build_model(get_config("ace-edit")).self_cond_embedder is None  # the default is unchanged


def test_init_from_a_base_without_the_new_inputs_starts_at_the_base():
    """``--init`` from a model without source_concat / self_condition: their weights start at zero (the head's
    three estimate columns inserted before source and noisy RGB), so the new model's output equals the base's for
    any estimate; a base that already has them loads unchanged; other mismatches are left to ``load_into``."""
    from omniace.engine.weights import load_into
    from omniace.train.trainer import add_new_inputs

    kw = dict(in_channels=3 * F2 * F2, codec_factor=F2, y_channels=Y, prediction="x0", source_skip=True,
              source_gate=True, pixel_head=K, pixel_smooth=S)
    base = randomise(build_model(get_config("ace-tiny", **kw)), seed=36, std=0.2).eval()
    grown = build_model(get_config("ace-tiny", **kw, source_concat=True, self_condition=True)).eval()
    load_into(grown, add_new_inputs(base.state_dict(), grown))
    assert grown.source_embedder.weight.abs().sum() == 0 and grown.self_cond_embedder.weight.abs().sum() == 0
    w0, w1 = base.pixel_head.fc1.weight, grown.pixel_head.fc1.weight
    assert torch.equal(w1[:, :-9], w0[:, :-6]) and torch.equal(w1[:, -6:], w0[:, -6:]) and not w1[:, -9:-6].any()
    batch = pack(_pixel_samples(14), P, with_mask=True)
    g = torch.Generator().manual_seed(37)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P, generator=g)
    t = torch.tensor([3, 400, 999, 77])
    with torch.no_grad():
        ref = base(batch, x, t)
        assert (grown(batch, x, t, x0_prev=torch.randn(x.shape, generator=g)) - ref).abs().max() < 1e-5
    trained = randomise(grown, seed=38, std=0.2).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in add_new_inputs(trained, grown).items())
    with pytest.raises(ValueError, match="shape mismatches"):  # a base of another width is not widened
        load_into(grown, add_new_inputs(build_model(get_config("ace-tiny", **{**kw, "pixel_head": K + 1}))
                                        .state_dict(), grown))


def test_sampling_feeds_each_step_the_previous_steps_estimate():
    """The pipeline's loop (run_job, and run_jobs over several requests) passes zeros at a request's first step
    and its last guided x0 estimate after; requests stepped together get what each gets alone."""
    from omniace.engine.codec import PixelCodec
    from omniace.engine.pipeline import EditPipeline, tiny_sampling, tiny_text_encoder

    cfg = get_config("ace-edit", depth=1, hidden_size=32, num_heads=2, self_condition=True)
    pipe = EditPipeline(randomise(build_model(cfg), seed=36, std=0.05), tiny_text_encoder(cfg), PixelCodec(4),
                        **tiny_sampling(cfg))
    calls = []
    real = pipe.model.forward

    def spy(batch, x, t, indicator_table=True, x0_prev=None):
        out = real(batch, x, t, indicator_table, x0_prev)
        calls.append((x0_prev.clone(), out.clone()))
        return out

    pipe.model.forward = spy
    g = torch.Generator().manual_seed(37)
    from PIL import Image

    img = lambda: Image.fromarray((torch.rand(24, 40, 3, generator=g) * 255).byte().numpy())
    jobs = [pipe.prepare_edit(img(), "{image} make the circle red", steps=4, guidance=g_, seed=k)
            for k, g_ in enumerate((1.0, 2.0))]
    alone = [pipe.run_job(pipe.prepare_edit(j.source, "{image} make the circle red", steps=4, guidance=j.guidance,
                                            seed=k)) for k, j in enumerate(jobs)]
    first = calls[:4]
    assert torch.equal(first[0][0], torch.zeros_like(first[0][0]))
    for (prev, _), (_, out_before) in zip(first[1:], first[:-1]):
        assert torch.equal(prev, out_before)  # one branch (guidance 1): the previous call's output
    calls.clear()
    together = pipe.run_jobs(jobs)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(alone, together))
    from omniace.engine.sampler import guide

    n = jobs[0].x.shape[0]
    out0, prev1 = calls[0][1], calls[1][0]  # step 1 reads step 0's output: job 0's rows, then job 1's two branches
    assert torch.equal(prev1[:n], out0[:n])
    guided = guide(out0[n:2 * n], out0[2 * n:], jobs[1].guidance, jobs[1].rescale, [0, n])
    assert torch.equal(prev1[n:2 * n], guided) and torch.equal(prev1[2 * n:], guided)  # both branches: the guided one
    assert not torch.equal(guided, out0[n:2 * n])  # guidance 2 moved it: the equality above can tell


# absolute coordinates (cfg.absolute_coords): PixArt's sin-cos position embedding and each pixel's (row, col)
def test_sincos_2d_is_dits_2d_position_embedding():
    """Reference: DiT's ``get_2d_sincos_pos_embed_from_grid`` in numpy (half the channels per axis, each
    ``[sin(p w), cos(p w)]``, ``w = 1 / 10000^(k / (D / 2))`` for the axis' D channels), rows first."""
    from omniace.engine.ace import sincos_2d

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rc = torch.tensor([[0, 0], [3, 7], [13, 2], [5, 11]], dtype=torch.int32)
    for dim in (8, 64, 192):
        ref = np.concatenate([one_axis(dim // 2, rc[:, 0].numpy()), one_axis(dim // 2, rc[:, 1].numpy())], axis=1)
        got = sincos_2d(rc, dim)
        assert got.dtype == torch.float32 and got.shape == (4, dim)
        assert np.abs(got.numpy() - ref).max() < 1e-5


def _coords_model(**over):
    cfg = get_config("ace-tiny", in_channels=3 * F2 * F2, codec_factor=F2, y_channels=Y, prediction="x0",
                     source_skip=True, source_gate=True, pixel_head=K, absolute_coords=True, **over)
    return build_model(cfg)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_absolute_coords_add_the_embedding_and_feed_each_pixel_its_position(dtype, tol):
    """Reference: (1) the first block's input is the same weights' input without the option plus ``sincos_2d`` of
    each token's (row, col); (2) one pixel at a time, [features, smooth, its (row, col) / COORD_UNIT, source RGB,
    noisy RGB] -> MLP -> gated change, the pixel's (row, col) read from an image of coordinates packed as the codec
    packs pixels. Odd grids, a sample with no source."""
    import dataclasses

    from omniace.engine.ace import PixelHead, sincos_2d

    model = randomise(_coords_model(pixel_smooth=S), seed=41, std=0.2).to(dtype).eval()
    batch, xf, out, feat = _head_inputs_and_output(model, 17, dtype)
    seen = []

    class Seen(Exception):  # the first block's input is all this reference needs: stop there
        pass

    def first_block_input(module, args):
        seen.append(args[0].float())
        raise Seen

    handle = model.blocks[0].register_forward_pre_hook(first_block_input)
    with torch.no_grad():
        for option in (True, False):
            model.cfg = dataclasses.replace(model.cfg, absolute_coords=option)
            with pytest.raises(Seen):
                model(batch, xf.to(dtype), torch.tensor([3, 400, 999, 77]))
    handle.remove()
    model.cfg = dataclasses.replace(model.cfg, absolute_coords=True)
    ref_embed = sincos_2d(batch.pos[:, 1:], model.cfg.hidden_size).to(dtype).float()
    assert (seen[0] - seen[1] - ref_embed).abs().max() < tol * 4
    c = xf.shape[1]
    n_pix = c // 3
    where = []  # [L_tgt, 2, n_pix]: each pixel's (row, col) in pixels, packed as the codec packs an image
    for (h, w) in batch.target_sizes:
        rows, cols = torch.meshgrid(torch.arange(h * F2, dtype=torch.float32),
                                    torch.arange(w * F2, dtype=torch.float32), indexing="ij")
        where.append(pack_pixels(torch.stack([rows, cols])).view(-1, 2, n_pix))
    where = (torch.cat(where) + 0.5) / (F2 * P) / PixelHead.COORD_UNIT  # in units of COORD_UNIT tokens
    smooth = _smooth_reference(batch, feat, n_pix)
    ref = _gated_pixel_loop(model, batch, feat, xf, lambda r, j: [smooth[r, :, j], where[r, :, j]])
    err = (out - ref).abs().max().item()
    assert err < tol * max(1.0, ref.abs().max().item()), err


def test_absolute_coords_gradients_flops_memory_and_settings():
    from omniace.engine.memory import estimate_memory

    model = randomise(_coords_model(), seed=43, std=0.1)
    batch = pack(_pixel_samples(3), P, with_mask=True)
    x = torch.randn(batch.target_index.numel(), 3 * F2 * F2 * P * P)
    model(batch, x, torch.tensor([1, 200, 3, 900])).pow(2).sum().backward()
    ph = model.pixel_head
    assert ph.fc1.in_features == K + 2 + 6 and ph.fc1.weight.grad[:, K:K + 2].abs().sum(0).min() > 0
    plain = _pixel_model(True)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters()) == 2 * 2 * K
    n_pix = F2 * F2 * P * P
    assert model.flops([[12]], [[7]]) - plain.flops([[12]], [[7]]) == 2 * 12 * n_pix * 2 * 2 * K
    grow = estimate_memory(model, 64, 8, 1, 4096).activations - estimate_memory(plain, 64, 8, 1, 4096).activations
    assert grow == 4096 * 4 * 4
    with pytest.raises(ValueError, match=r"absolute_coords reads each target token's grid position: pass token_rc"):
        ph(torch.zeros(2, n_pix * K), torch.zeros(2, 3 * n_pix), torch.zeros(2, 3 * n_pix),
           torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="absolute_coords splits the hidden size .* divisible by 4, got 66"):
        get_config("ace-tiny", hidden_size=66, num_heads=3, absolute_coords=True)
    for bad in (1, "true", None):
        with pytest.raises(ValueError, match=f"absolute_coords must be True or False, got {re.escape(repr(bad))}"):
            get_config("ace-edit", absolute_coords=bad)
    assert not get_config("ace-edit").absolute_coords  # the default is unchanged
