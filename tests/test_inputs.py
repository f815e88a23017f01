"""User-facing inputs of the engine: sampler arguments, text truncation, masks, sessions, weights files."""
import math
import os
import re
import warnings

import numpy as np

import pytest
import torch
from PIL import Image

from omniace.engine.lcu import MAX_INDICATORS
from omniace.engine.model import build_model, load_model, save_model
from omniace.engine.pipeline import EditPipeline, EditSession, Turn, latent_mask, mask_to_latent, turn_inputs
from omniace.engine.sampler import DDIMSampler, FlowEulerSampler, guide, make_sampler
from omniace.engine.text import TinyTextEncoder, TruncationWarning
from omniace.engine.weights import convert, load_state_dict_file, save_safetensors

from helpers import demo_scene, randomise


@pytest.fixture(scope="module")
def pipe():
    p = EditPipeline.tiny("ace")
    randomise(p.model, 5, std=0.05)
    return p


@pytest.fixture
def no_model_work(pipe, monkeypatch):
    """Fails the test if the pipeline encodes an image or runs its model."""
    def fail(*a, **k):
        raise AssertionError("model work started before the arguments were checked")
    monkeypatch.setattr(pipe.codec, "encode", fail)
    monkeypatch.setattr(pipe.text_encoder, "encode", fail)
    return pipe


# item 2: sampler arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: make_sampler("eps", 0), r"steps must be an integer in \[1, 1000\], got 0"),  # ZeroDivisionError
    (lambda: make_sampler("flow", 0), "steps must be an integer >= 1, got 0"),  # pure noise
    (lambda: make_sampler("x0", -1), r"steps must be an integer in \[1, 1000\], got -1"),  # a torch error
    (lambda: make_sampler("eps", 2.5), r"got 2.5"),
    (lambda: make_sampler("flow", True), "got True"),
    (lambda: DDIMSampler(steps=1001), r"steps must be an integer in \[1, 1000\], got 1001"),
    (lambda: FlowEulerSampler(steps=4, shift=math.nan), "shift must be a finite number, got nan"),
    (lambda: FlowEulerSampler(steps=4, shift=0.0), "shift must be a finite number > 0, got 0.0"),
    (lambda: DDIMSampler(prediction="v"), "prediction 'v'"),
    (lambda: DDIMSampler(timestep_spacing="leading"), r"timestep_spacing 'leading'; expected one of \('trailing', 'sigma'\)"),
    (lambda: make_sampler("x0", 300, timestep_spacing="sigma"),
     r"timestep_spacing 'sigma' with steps=300 repeats training steps \(299 distinct of 1000\); use at most 271 "
     r"steps, or the 'trailing' spacing"),
    (lambda: make_sampler("flow", 10, timestep_spacing="sigma"), "timestep_spacing 'sigma' is a DDIM setting"),
])
def test_samplers_refuse_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_guide_refuses_non_finite_guidance():
    c, u = torch.randn(6, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="guidance must be a finite number, got nan"):
        guide(c, u, math.nan, 0.5, [0, 6])
    with pytest.raises(ValueError, match=r"rescale must be a finite number >= 0.0 and <= 1.0, got inf"):
        guide(c, u, 4.5, math.inf, [0, 6])


@pytest.mark.parametrize("kw, message", [
    ({"steps": 0}, r"steps must be an integer in \[1, 1000\], got 0"),
    ({"steps": -1}, "got -1"),
    ({"guidance": math.nan}, "guidance must be a finite number, got nan"),  # an all-black PNG today
    ({"guidance": -math.inf}, "guidance must be a finite number, got -inf"),
    ({"rescale": math.nan}, "rescale must be a finite number >= 0.0 and <= 1.0, got nan"),
    ({"seed": -3}, r"seed must be an integer in \[0, 9223372036854775807\], got -3"),
    ({"size": (64, 64)}, r"size=\(64, 64\) is for text-to-image; an edit keeps the size of its first image \(32x32\)"),
    ({"negative": None}, "negative must be a str, got NoneType"),
])
def test_edit_checks_arguments_before_model_work(no_model_work, kw, message):
    with pytest.raises((ValueError, TypeError), match=message):
        no_model_work.edit(demo_scene(32, 32), "{image} make it blue", **kw)


def test_text_to_image_size_is_checked(no_model_work):
    with pytest.raises(ValueError, match=r"size height must be an integer >= 1, got 0"):
        no_model_work.edit(None, "a red ball", size=(64, 0))
    with pytest.raises(ValueError, match=r"size must be \(width, height\) in pixels, got 64"):
        no_model_work.edit(None, "a red ball", size=64)


def test_sd3_steps_zero_is_refused():
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        EditPipeline.tiny("sd3").edit(demo_scene(32, 32), "make it night", steps=0)


def test_non_finite_latent_stops_sampling_naming_the_step():
    x = torch.randn(8, 4)
    calls = []

    def nan_at_second_step(x, t):
        calls.append(1)
        return x * (math.nan if len(calls) == 2 else 0.5)

    with pytest.raises(FloatingPointError, match="DDIMSampler: the latent is not finite .* after step 2 of 5"):
        DDIMSampler(steps=5, prediction="x0").sample(nan_at_second_step, x, 1)
    assert len(calls) == 2  # stopped there
    with pytest.raises(FloatingPointError, match="FlowEulerSampler: .* after step 1 of 3"):
        FlowEulerSampler(steps=3).sample(lambda x, t: torch.full_like(x, math.inf), x, 1)


def test_nan_model_raises_instead_of_a_black_image():
    p = EditPipeline.tiny("ace")
    with torch.no_grad():
        p.model.final_layer.linear.weight.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="after step 1 of 2"):
        p.edit(demo_scene(32, 32), "{image} make it blue", steps=2)


# item 3: truncation --------------------------------------------------------------------------------

def test_byte_encoder_warns_or_refuses_naming_the_dropped_text():
    enc = TinyTextEncoder(16, max_len=16)  # keeps 15 bytes + EOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # text that fits: no warning
        assert enc.tokenize("fifteen bytes!!") == [b + 2 for b in b"fifteen bytes!!"] + [1]
    with pytest.warns(TruncationWarning, match=r"is 19 UTF-8 bytes; the byte-level text encoder keeps 15: "
                                               r"dropped 'fXYZ'"):
        ids = enc.tokenize("0123456789abcdefXYZ")
    assert ids == [b + 2 for b in b"0123456789abcde"] + [1]  # what the model sees is unchanged
    with pytest.raises(ValueError, match="it would drop 'fXYZ'"):
        enc.encode(["0123456789abcdefXYZ"], truncate=False)
    # a multi-byte character cut by the limit counts as dropped; the model keeps today's 15 bytes
    text = "é" * 9  # 18 bytes
    with pytest.warns(TruncationWarning, match="dropped 'éé'"):
        assert enc.tokenize(text) == [b + 2 for b in text.encode()[:15]] + [1]


def test_long_instructions_warn_in_the_pipeline(pipe):
    base = "{image} make the red circle blue and the green square large, so"
    assert len(base.encode()) == pipe.text_encoder.max_len - 1 == 63
    a, b = base + " at dawn", base + " at dusk"  # differ only past byte 63: the same image
    with pytest.warns(TruncationWarning, match="is 71 UTF-8 bytes; the byte-level text encoder keeps 63: "
                                               "dropped ' at dawn'"):
        out_a = pipe.edit(demo_scene(32, 32), a, steps=1)[0]
    with pytest.warns(TruncationWarning, match="dropped ' at dusk'"):
        out_b = pipe.edit(demo_scene(32, 32), b, steps=1)[0]
    assert out_a.tobytes() == out_b.tobytes()
    with pytest.raises(ValueError, match="it would drop ' at dawn'"):
        pipe.edit(demo_scene(32, 32), a, steps=1, truncate=False)
    with pytest.raises(ValueError, match="would drop 'x'"):  # the negative prompt too
        pipe.edit(demo_scene(32, 32), "{image} blue", negative="n" * 63 + "x", steps=1, truncate=False)


def test_t5_encoder_truncation(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from omniace.engine.text import T5TextEncoder

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(20)]
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(tmp_path)
    enc = T5TextEncoder(tmp_path, max_len=6, dtype=torch.float32)  # 5 words + EOS
    with pytest.warns(TruncationWarning, match="is 9 T5 tokens; T5TextEncoder keeps 6: dropped 'w6 w7 w8'"):
        out = enc.encode(["w1 w2 w3", "w1 w2 w3 w4 w5 w6 w7 w8"])
    assert [o.tokens.shape[0] for o in out] == [4, 6]
    with pytest.raises(ValueError, match="it would drop 'w6 w7'"):  # 7 words + EOS: 5 words and the EOS kept
        enc.encode(["w1 w2 w3 w4 w5 w6 w7"], truncate=False)


# item 7: masks that do not fit their image ---------------------------------------------------------

def test_mask_of_another_aspect_ratio_is_refused(no_model_work):
    with pytest.raises(ValueError, match=r"mask 0 \(for image 0\) is 16x128 but its image is 64x64"):
        no_model_work.edit(demo_scene(64, 64), "{image} x", masks=Image.new("L", (16, 128), 255))
    with pytest.raises(ValueError, match=r"mask 1 \(for image 1\) is 50x32 but its image is 96x64"):
        no_model_work.edit([demo_scene(32, 32), demo_scene(96, 64)], "{image} x",
                           masks=[None, Image.new("L", (50, 32))])
    with pytest.raises(ValueError, match="mask is 8x8 but its image is 64x32"):
        mask_to_latent(torch.zeros(8, 8), 8, 16, image_size=(64, 32))
    with pytest.raises(ValueError, match="2 masks for 1 image;"):
        no_model_work.edit(demo_scene(32, 32), "{image} x", masks=[None, None])
    with pytest.raises(ValueError, match="1 mask for 0 images;"):
        no_model_work.edit([], "a red circle", masks=Image.new("L", (8, 8)))


def test_mask_of_the_same_aspect_ratio_is_resized(pipe):
    big = Image.new("L", (64, 64), 0)
    big.paste(255, (0, 0, 32, 16))
    small = big.resize((32, 32), Image.NEAREST)
    src = demo_scene(64, 64)
    want = pipe.edit(src, "{image} paint it", masks=big, steps=1, guidance=1.0)[0]
    assert pipe.edit(src, "{image} paint it", masks=small, steps=1, guidance=1.0)[0].tobytes() == want.tobytes()
    # 96x64 at 32 px high is 48 px wide; 49 is within one pixel of rounding
    assert mask_to_latent(Image.new("L", (49, 32), 255), 16, 24, image_size=(96, 64)).shape == (16, 24)


@pytest.mark.parametrize("mask, error, message", [
    (torch.zeros(64), ValueError, r"mask 0 \(for image 0\) has shape \(64,\); expected a non-empty \[H, W\]"),
    (torch.zeros(2, 64, 64), ValueError, r"has shape \(2, 64, 64\); expected"),  # was a raw RuntimeError
    (torch.zeros(1, 1, 64, 64), ValueError, r"has shape \(1, 1, 64, 64\)"),
    (torch.zeros(0, 64), ValueError, r"has shape \(0, 64\)"),
    (torch.ones(64, 64), ValueError,
     r"values 1..1, which on the 0..255 scale .* pass mask.bool\(\) or \(mask.float\(\) \* 255\)"),
    (torch.rand(64, 64) * 0.9 + 0.05, ValueError, r"which on the 0..255 scale"),  # a soft 0-1 mask
    (torch.full((64, 64), 300.0), ValueError, r"values 300..300; expected 0..255"),
    (torch.full((64, 64), -1, dtype=torch.int32), ValueError, r"values -1..-1; expected 0..255"),
    (torch.full((64, 64), math.nan), ValueError, "holds NaN or inf"),
    (torch.zeros(64, 64, dtype=torch.complex64), TypeError, "dtype torch.complex64; expected bool or a real"),
])
def test_bad_tensor_masks_are_refused_by_name(no_model_work, mask, error, message):
    with pytest.raises(error, match=message):
        no_model_work.edit(demo_scene(64, 64), "{image} x", masks=mask)


def test_bool_and_0_255_tensor_masks_match_the_image_mask(pipe):
    """A bool mask (True = edit) and a 0..255 mask of any real dtype select the same latent cells as the
    equivalent L image; an all-zero mask is "no mask" (edit everywhere), as an all-black image."""
    region = torch.zeros(64, 48, dtype=torch.bool)
    region[10:37, 5:29] = True  # odd bounds: not on the 8-pixel grid
    image = Image.fromarray(region.to(torch.uint8).numpy() * 255)
    want = mask_to_latent(image, 8, 6)
    assert 0 < float(want.mean()) < 1
    for m in (region, region[None], region.to(torch.uint8) * 255, region.double() * 200, region.half() * 255):
        assert torch.equal(mask_to_latent(m, 8, 6), want), m.dtype
    assert torch.equal(mask_to_latent(torch.zeros(64, 48), 8, 6), torch.ones(8, 6))
    src = demo_scene(48, 64)
    a = pipe.prepare([], Turn("{image} x", *turn_inputs(src, region)), None, 1, 1.0, 0.5, 0, "")
    b = pipe.prepare([], Turn("{image} x", *turn_inputs(src, image)), None, 1, 1.0, 0.5, 0, "")
    assert torch.equal(a.samples[0].target.mask, b.samples[0].target.mask)


@pytest.mark.parametrize("mask, message", [
    (Image.new("L", (64, 64), 1), r"mask 0 \(for image 0\) marks no pixel: white \(luma > 128\) marks what to edit, "
                                  r"and its largest value is 1 \(a 0/1 mask: scale it to 0/255\); omit the mask"),
    (Image.new("L", (64, 64), 0), r"marks no pixel: .* largest value is 0; omit"),
    (Image.new("L", (64, 64), 128), r"marks no pixel: .* largest value is 128; omit"),  # the threshold is > 128
    (torch.full((64, 64), 100.0), r"marks no pixel: .* largest value is 100 \(a mask on another scale, such as "
                                  r"0..100, must be rescaled to 0..255\); omit"),  # a 0..100 percent mask
    (torch.zeros(64, 64, dtype=torch.bool), r"marks no pixel: it is False everywhere \(True marks what to edit\)"),
    (Image.new("RGBA", (64, 64), (255, 255, 255, 0)).convert("RGB").point(lambda v: 0), r"marks no pixel"),
])
def test_a_mask_that_marks_nothing_is_refused(no_model_work, mask, message):
    """It meant "edit everywhere" (ACE's rule for the training data's empty masks): a user's 0/1 PNG, black mask
    or percent mask edited the whole image with no word."""
    with pytest.raises(ValueError, match=message):
        no_model_work.edit(demo_scene(64, 64), "{image} x", masks=mask)


def test_a_mask_lost_on_the_latent_grid_is_refused(no_model_work):
    """Marked pixels that fall between the latent cells (nearest sampling) or in the margin a crop removes."""
    thin = Image.new("L", (100, 64), 0)
    thin.paste(255, (0, 0, 2, 64))  # columns 0-1: cropped away (100 -> 96 wide), and between cells when resized
    for resize, extra in (("crop", " or in the margin the crop removes; mark a larger area inside the kept centre, "
                                   "or use the resize mode 'resize'"), ("resize", "; mark a larger area")):
        with pytest.raises(ValueError, match=rf"mask 0 \(for image 0\) marks 128 pixel\(s\), and none is left on "
                                             rf"the \d+x16 latent grid of its fitted image \(\d+x64 pixels, 4 per "
                                             rf"latent cell\): they fall between the cells{extra}"):
            no_model_work.edit(demo_scene(100, 64), "{image} x", masks=thin, resize=resize)
    dot = Image.new("L", (96, 64), 0)
    dot.paste(255, (40, 20, 44, 24))  # 4x4 pixels: one whole latent cell survives
    assert int(latent_mask(dot, no_model_work.fit((96, 64)), 4).sum()) == 1


def test_a_mask_marked_by_transparency_is_refused(no_model_work, tmp_path):
    """Alpha is dropped, so white-on-transparent-white read as all white: "edit everywhere", silently. A mask whose
    transparency agrees with its colour (white square, transparent black elsewhere) still works."""
    from PIL import ImageDraw

    bad = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    ImageDraw.Draw(bad).rectangle((16, 16, 47, 47), fill=(255, 255, 255, 255))
    bad.save(tmp_path / "alpha.png")
    for src in (bad, str(tmp_path / "alpha.png"), (tmp_path / "alpha.png").read_bytes()):
        with pytest.raises(ValueError, match=r"mask 0 marks its edit area with transparency, which masks ignore .* "
                                             r"flatten it onto black first"):
            no_model_work.edit(demo_scene(64, 64), "{image} x", masks=src)
    good = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(good).rectangle((16, 16, 47, 47), fill=(255, 255, 255, 255))
    assert turn_inputs(demo_scene(64, 64), good)[1][0].convert("L").getextrema() == (0, 255)
    from omniace.engine.cli import main

    with pytest.raises(SystemExit) as e:
        main(["edit", "--image", str(tmp_path / "alpha.png"), "--mask", str(tmp_path / "alpha.png"),
              "--instruction", "{image} x", "--out", str(tmp_path / "o.png")])
    assert e.value.code == 2 and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("masks, error, message", [
    (np.zeros((64, 64), np.uint8), TypeError, r"got a numpy array; pass torch.from_numpy\(mask\)"),  # was "ambiguous"
    ([None, np.zeros((64, 64), np.uint8)], TypeError, "got a numpy array"),
    (5, TypeError, "masks must be a PIL image, a path, bytes, an \\[H, W\\] tensor or a list of them, got int"),
    (Image.new("L", (0, 0)), ValueError, r"mask 0 \(for image 0\) is 0x0: empty"),  # was a raw RuntimeError
    (torch.empty(64, 64, device="meta"), TypeError, "is a meta tensor; expected a dense tensor"),
    (torch.ones(64, 64).to_sparse(), TypeError, "is a torch.sparse_coo tensor; expected a dense tensor"),
])
def test_masks_of_the_wrong_kind_are_refused_by_name(no_model_work, masks, error, message):
    with pytest.raises(error, match=message):
        no_model_work.edit(demo_scene(64, 64), "{image} x", masks=masks)


# item 8: sessions past nine turns ------------------------------------------------------------------

def test_session_keeps_working_past_nine_turns(pipe):
    s = EditSession(pipe)
    img = demo_scene(32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for turn in range(12):
            img = s.edit("{image} a bit bluer", images=[img] if turn == 0 else None, steps=1, guidance=1.0)
    dropped = [str(w.message) for w in caught if "dropped the oldest" in str(w.message)]
    # turn 9 (the tenth) would need 10 condition images: one turn leaves, then one per turn
    assert len(dropped) == 3 and dropped[0].startswith("EditSession turn 9: dropped the oldest 1 turn(s)")
    assert "10 condition images, the model takes at most 9" in dropped[0]
    assert len(s.history) == MAX_INDICATORS - 1 and s.turns == 12 and s.last is img
    # the remaining history is renumbered from {image}
    assert [t.instruction for t in s.history[:3]] == ["{image} a bit bluer", "{image1} a bit bluer",
                                                      "{image2} a bit bluer"]


def test_session_max_history_and_multi_image_turns(pipe):
    s = EditSession(pipe, max_history=2)
    a, b = demo_scene(32, 32, seed=1), demo_scene(32, 32, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dropping what max_history asks for is not warned about
        for _ in range(4):
            s.edit("{image} bluer", images=[a], steps=1, guidance=1.0)
    assert len(s.history) == 2 and s.history[1].instruction == "{image1} bluer"
    # a three-image turn on a full history of nine images drops the three oldest one-image turns
    s = EditSession(pipe)
    for _ in range(9):
        s.edit("{image} x", images=[a], steps=1, guidance=1.0)
    with pytest.warns(UserWarning, match="dropped the oldest 3 turn"):
        s.edit("{image} with {image2}", images=[a, b, a], steps=1, guidance=1.0)
    assert len(s.history) == 7 and s.history[-1].instruction == "{image6} with {image8}"
    with pytest.raises(ValueError, match="turn 10: 10 images; at most 9 condition images"):
        s.edit("{image}", images=[a] * 10, steps=1)
    with pytest.raises(ValueError, match="max_history must be an integer >= 0, got -1"):
        EditSession(pipe, max_history=-1)


def test_failed_turn_leaves_the_session_unchanged(pipe):
    s = EditSession(pipe)
    first = s.edit("{image} x", images=[demo_scene(32, 32)], steps=1, guidance=1.0)
    with pytest.raises(ValueError, match=r"mask 0 \(for image 0\) is 16x128 but its image is 32x32"):
        s.edit("{image} y", masks=[Image.new("L", (16, 128))], steps=1)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        s.edit("{image} y", steps=1, guidance=math.nan)
    assert len(s.history) == 1 and s.turns == 1 and s.last is first


# items 4 and 5: weights files ----------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_weights_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
        save_model(build_model("ace-tiny"), tmp_path / "m.safetensors")
        torch.save({"w": torch.ones(2)}, tmp_path / "w.pth")
        convert(tmp_path / "w.pth", tmp_path / "c.safetensors", family="none")
    finally:
        os.umask(old)
    for name in ("a", "m", "c"):
        assert oct(os.stat(tmp_path / f"{name}.safetensors").st_mode & 0o777) == oct(mode), name


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    torch.save(model.state_dict(), tmp_path / "tied.pth")
    assert convert(tmp_path / "tied.pth", tmp_path / "tied.safetensors", family="none") == 2
    sd = load_state_dict_file(tmp_path / "tied.safetensors")
    assert sorted(sd) == ["embed.weight", "head.weight"] and sd["head.weight"] is sd["embed.weight"]
    assert torch.equal(sd["embed.weight"], model.embed.weight)
    # a tensor named three times, and two views of one buffer that overlap but differ
    w, buf = torch.randn(3, 2), torch.randn(8)
    save_safetensors({"a": w, "b": w, "c": w, "lo": buf[:6], "hi": buf[2:]}, tmp_path / "v.safetensors")
    sd = load_state_dict_file(tmp_path / "v.safetensors")
    assert sd["b"] is sd["a"] and sd["c"] is sd["a"]
    assert torch.equal(sd["lo"], buf[:6]) and torch.equal(sd["hi"], buf[2:])


def _damaged(path, how):
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\xff" * 16 + data[16:]}[how])
    return path


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_weights_files_are_refused_naming_them(tmp_path, how, suffix):
    path = tmp_path / f"w{suffix}"
    sd = {"w": torch.randn(64, 64)}
    save_safetensors(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    _damaged(path, how)
    message = "neither a safetensors file nor a torch checkpoint \\(it starts with b'\\\\xff" \
        if (suffix, how) == (".pth", "garbage") else "not a readable checkpoint, it may be truncated or corrupt"
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_state_dict_file(path)


def test_an_image_given_as_weights_is_named_as_neither_format(tmp_path):
    """A fresh user passed a PNG to --init: it was unpickled and refused as needing pickled code."""
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    with pytest.raises(ValueError, match=r"in.png: neither a safetensors file nor a torch checkpoint \(it starts "
                                         r"with b'\\x89PNG"):
        load_state_dict_file(tmp_path / "in.png")
    # a garbled pickle stream still reaches torch's weights-only unpickler, which refuses it
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="bad.pth: (cannot be loaded without executing pickled code|not a readable)"):
        load_state_dict_file(tmp_path / "bad.pth")


def test_load_model_refuses_a_truncated_export(tmp_path):
    save_model(build_model("ace-tiny"), tmp_path / "m.safetensors")
    path = _damaged(tmp_path / "m.safetensors", "truncated")
    with pytest.raises(ValueError, match="m.safetensors: not a readable checkpoint"):
        load_model(path)


# from a fresh user's run: sizes, the one decoder in the Python API, types -----------------------------------

def test_an_oversized_request_is_refused_before_any_allocation(no_model_work):
    """A 4000x4000 image (250k tokens per frame) or a 16000x16000 size: refused from the sizes alone."""
    big = Image.new("RGB", (4000, 4000))
    with pytest.raises(ValueError, match=r"needs 500000 image tokens per sample .* over the pipeline's "
                                         r"max_tokens of 16384"):
        no_model_work.edit(big, "{image} x", steps=1, resize="error")  # kept at its size (the default scales it)
    with pytest.raises(ValueError, match=r"needs 4000000 image tokens per sample \(the target image "
                                         r"16000x16000\)"):
        no_model_work.edit(None, "x", size=(16000, 16000), steps=1)
    with pytest.raises(ValueError, match=r"needs 256 image tokens per step \(2 CFG branch\(es\) of 64x64, 64x64\), "
                                         r"more than the budget of 200"):
        no_model_work.prepare([], Turn("{image} x", *turn_inputs(demo_scene(64, 64), None)), None, 2, 3.0, 0.5, 0,
                              "", budget=(200, "the budget"))


def test_pil_images_in_the_python_api_go_through_the_one_decoder(pipe, tmp_path):
    """EXIF orientation, 16-bit grey and refused modes: the same in ``EditPipeline.edit`` as on the CLI."""
    from omniace.engine.imageio import decode_image

    img = Image.new("RGB", (64, 32), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    out = pipe.edit(Image.open(tmp_path / "r.jpg"), "{image} x", steps=1, seed=1)[0]
    assert out.size == (32, 64)
    assert out.tobytes() == pipe.edit(decode_image(tmp_path / "r.jpg"), "{image} x", steps=1, seed=1)[0].tobytes()
    assert pipe.edit(tmp_path / "r.jpg", "{image} x", steps=1, seed=1)[0].tobytes() == out.tobytes()  # a path too
    grey16 = Image.fromarray(np.full((32, 32), 100 * 257, dtype=np.uint16))
    a = pipe.edit(grey16, "{image} x", steps=1)[0]
    b = pipe.edit(Image.new("RGB", (32, 32), (100, 100, 100)), "{image} x", steps=1)[0]
    assert a.tobytes() == b.tobytes()  # scaled to 100, not clipped to white
    with pytest.raises(ValueError, match="image 0: image mode 'LAB' is not supported"):
        pipe.edit(Image.new("LAB", (32, 32)), "{image} x", steps=1)


@pytest.mark.parametrize("call, error, message", [
    (lambda p: p.edit(5, "{image} x"), TypeError, "images must be a PIL image, a path, bytes or a list of them, got int"),
    (lambda p: p.edit([demo_scene(64, 64), 3.0], "{image} x"), TypeError, "image 1 must be a PIL image, a path or bytes"),
    (lambda p: p.edit(demo_scene(64, 64), "{image} x", masks=[7]), TypeError, "mask 0 must be a PIL image"),
    (lambda p: p.edit(demo_scene(64, 64), "{image} x", masks=["missing.png"]), ValueError, "mask 0: cannot decode"),
])
def test_wrong_types_are_named(no_model_work, call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call(no_model_work)


def test_numpy_integers_and_the_default_guidance(pipe):
    out = pipe.edit(demo_scene(64, 64), "{image} x", steps=np.int64(1), seed=np.int64(3))[0]
    assert out.tobytes() == pipe.edit(demo_scene(64, 64), "{image} x", steps=1, seed=3)[0].tobytes()
    assert pipe.default_guidance == 4.5 and EditPipeline.pretrained().default_guidance == 1.0
    same = pipe.edit(demo_scene(64, 64), "{image} x", steps=1, seed=3, guidance=4.5)[0]
    assert out.tobytes() == same.tobytes()  # guidance=None is the pipeline's default


def test_the_pipelines_timestep_spacing_reaches_its_sampler(pipe):
    """ACE's trailing spacing by default; the embedded default samples with "sigma" (docs/default_model.md)."""
    from omniace.engine.pipeline import Turn

    default = EditPipeline.pretrained()
    for p, spacing in ((pipe, "trailing"), (default, "sigma")):
        job = p.prepare([], Turn("{image} x", [demo_scene(64, 64)], [None]), None, 10, None, 0.0, 0, "")
        assert p.timestep_spacing == spacing and job.sampler.timestep_spacing == spacing
        want = DDIMSampler(steps=10, timestep_spacing=spacing).timesteps()
        assert torch.equal(torch.cat([job.sampler.timestep(i) for i in range(10)]), want)
    with pytest.raises(ValueError, match="timestep_spacing 'karras'; expected one of"):
        EditPipeline(pipe.model, pipe.text_encoder, pipe.codec, timestep_spacing="karras")


def test_an_unusable_device_or_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="device 'xyz' is not usable here"):
        EditPipeline.pretrained(device="xyz")
    from omniace.engine.config import get_config
    from omniace.engine.model import save_weights

    cfg = get_config("ace-tiny")
    model = EditPipeline.tiny().model
    save_weights(model.state_dict(), cfg, tmp_path / "m.safetensors", metadata={})
    raw = (tmp_path / "m.safetensors").read_bytes()
    bad = raw.replace(b'\\"num_heads\\": 4', b'\\"num_heads\\": 0')
    assert bad != raw
    (tmp_path / "bad.safetensors").write_bytes(bad)
    with pytest.raises(ValueError, match=r"bad.safetensors: its omniace_config metadata does not describe a model"):
        load_model(tmp_path / "bad.safetensors")
