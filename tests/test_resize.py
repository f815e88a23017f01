"""Any input size (issue 12 item 1): images are fitted to the model grid as diffusers' VaeImageProcessor does,
and the output comes back at the input's size; masks follow their image."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from omniace.engine.pipeline import EditPipeline, EditSession, Turn, turn_inputs
from omniace.engine.resize import fit, pixel_budget
from omniace.export.runtime import EditServer

from helpers import demo_scene, randomise


@pytest.fixture(scope="module")
def pipe():
    p = EditPipeline.tiny("ace")
    randomise(p.model, 5, std=0.05)
    return p


def marked(size, box):
    """A scene with a pure-blue rectangle at ``box`` and the mask (L, white there) marking it."""
    img = demo_scene(*size)
    ImageDraw.Draw(img).rectangle(box, fill=(0, 0, 255))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return img, mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# the geometry ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, mode, grid, cover", [
    ((37, 53), "resize", (32, 48), (32, 48)),
    ((250, 100), "resize", (248, 96), (248, 96)),
    ((250, 100), "crop", (248, 96), (248, 99)),  # covers the grid with the aspect kept, then crops 3 rows
    ((37, 53), "crop", (32, 48), (33, 48)),
    ((64, 40), "crop", (64, 40), (64, 40)),  # on the grid: untouched
    ((4000, 3000), "resize", (584, 440), (584, 440)),  # scaled into the 512x512 budget, aspect kept
])
def test_fit_geometry(size, mode, grid, cover):
    f = fit(size, 8, mode, max_pixels=512 * 512)
    assert (f.grid, f.cover) == (grid, cover)
    assert f.grid[0] * f.grid[1] <= 512 * 512 and f.grid[0] % 8 == 0 and f.grid[1] % 8 == 0


def test_fit_refusals_name_the_size():
    with pytest.raises(ValueError, match=r"image 0: image size 1x300 is too small for the model: fitted to its "
                                         r"8-pixel grid it is 0x296; expected at least 8 pixels a side"):
        fit((1, 300), 8, "resize", what="image 0")
    with pytest.raises(ValueError, match=r"image size 20x40000 is too elongated for the model: scaled to its budget "
                                         r"\(65536 pixels\) and its 8-pixel grid it is 0x11448; .* \(crop it to a less "
                                         r"elongated region first\)"):
        fit((20, 40000), 8, "crop", max_pixels=256 * 256)  # 20 px wide, but scaled into the budget
    with pytest.raises(ValueError, match=r"\(65536 pixels and 512 a side\) .* it is 512x0"):
        fit((100000, 8), 8, "resize", max_pixels=256 * 256, max_side=512)
    for small in ((1, 1), (7, 64), (1, 300)):  # 'error' named the resize modes, which refuse these too
        with pytest.raises(ValueError, match=rf"image size {small[0]}x{small[1]} is too small for the model; "
                                             r"expected at least 8 pixels a side \(pad it first\)$"):
            fit(small, 8, "error")
    for empty in ((0, 0), (0, 40), (40, 0)):  # PIL makes such images; was a ZeroDivisionError
        for mode in ("resize", "crop", "error"):
            with pytest.raises(ValueError, match=rf"image 2: image size {empty[0]}x{empty[1]} is empty; expected "
                                                 r"at least 8x8 pixels"):
                fit(empty, 8, mode, max_pixels=512 * 512, what="image 2")
    with pytest.raises(ValueError, match="image size 37x53 is not a multiple of patch x codec factor = 8 pixels"):
        fit((37, 53), 8, "error")
    with pytest.raises(ValueError, match=r"resize 'stretch' is not a resize mode; expected one of \('resize', "
                                         r"'crop', 'error'\)"):
        fit((64, 64), 8, "stretch")


def test_pixel_budgets_follow_the_preset():
    assert pixel_budget("ace-0.6b-1024") == (1024 * 1024, None)
    assert pixel_budget("ace-0.6b-512") == (512 * 512, None)
    assert pixel_budget("sd3-medium-editnet") == (1024 * 1024, 192 * 16)  # sample_size 128 x VAE 8
    assert pixel_budget("sd3-tiny-editnet") == (128 * 128, 32 * 8)
    f = fit((6000, 400), 16, "resize", *pixel_budget("sd3-medium-editnet"))  # 15:1: the position table binds
    assert f.grid == (3072, 192)


@pytest.mark.parametrize("mode", ["resize", "crop"])
@pytest.mark.parametrize("size", [(37, 53), (250, 100), (101, 67)])
def test_fit_matches_diffusers_vae_image_processor(mode, size):
    """The same pixels as diffusers' own processor at the same grid size (resize_mode "default" / "crop")."""
    image_processor = pytest.importorskip("diffusers.image_processor")
    proc = image_processor.VaeImageProcessor(vae_scale_factor=8)
    img = demo_scene(*size, seed=3)
    h, w = proc.get_default_height_width(img)
    f = fit(size, 8, mode)
    assert f.grid == (w, h)
    ref = proc.resize(img, h, w, resize_mode="default" if mode == "resize" else "crop")
    assert np.array_equal(np.asarray(f.image(img)), np.asarray(ref))


@pytest.mark.parametrize("mode", ["resize", "crop"])
@pytest.mark.parametrize("size, box", [((250, 100), (150, 20, 210, 70)), ((37, 53), (3, 5, 20, 30))])
def test_a_mask_keeps_marking_its_region(mode, size, box):
    """On the grid the mask marks the blue region of the fitted image; back at the input size it marks the
    region it marked."""
    img, mask = marked(size, box)
    f = fit(size, 8, mode)
    on_grid = np.asarray(f.mask(mask)) > 128
    blue = np.asarray(f.image(img)).astype(int)
    blue = (blue[..., 2] > 200) & (blue[..., 0] < 60) & (blue[..., 1] < 60)
    assert set(np.unique(np.asarray(f.mask(mask)))) <= {0, 255}  # nearest: no new values
    assert iou(on_grid, blue) > 0.85
    back = f.restore(f.mask(mask).convert("RGB"), mask.convert("RGB")).convert("L")
    assert back.size == size and iou(np.asarray(back) > 128, np.asarray(mask) > 128) > 0.85


def test_crop_pastes_the_output_back_over_its_region():
    src = demo_scene(250, 100, seed=1)
    f = fit(src.size, 8, "crop")
    out = f.restore(Image.new("RGB", f.grid, (7, 7, 7)), src)
    a, s = np.asarray(out), np.asarray(src)
    rows = np.where((a == 7).all(axis=(1, 2)))[0]  # the rows the grid output covers
    assert out.size == src.size and 0 < rows[0] and rows[-1] < 99  # a crop of ~1 row at the top and bottom
    assert np.array_equal(a[:rows[0]], s[:rows[0]]) and np.array_equal(a[rows[-1] + 1:], s[rows[-1] + 1:])
    with pytest.raises(ValueError, match="restoring a crop needs its 250x100 source image"):
        f.restore(out)


# the pipeline, the session, the server ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["resize", "crop"])
@pytest.mark.parametrize("size", [(37, 53), (250, 100)])
def test_edit_takes_any_size_and_returns_it(pipe, mode, size):
    img, mask = marked(size, (10, 10, 30, 40))
    out = pipe.edit(img, "{image} make it red", masks=mask, steps=1, resize=mode)[0]
    assert out.size == size
    if mode == "crop":  # outside the cropped region the input's pixels are kept
        f = pipe.fit(size, mode)
        left = round(f.box[0] * size[0] / f.cover[0])
        top = round(f.box[1] * size[1] / f.cover[1])
        assert np.array_equal(np.asarray(out)[:top], np.asarray(img)[:top])
        assert np.array_equal(np.asarray(out)[:, :left], np.asarray(img)[:, :left])


def test_on_grid_images_and_text_to_image(pipe):
    src = demo_scene(64, 40)
    ref = pipe.edit(src, "{image} x", steps=2, resize="error")[0]
    assert pipe.edit(src, "{image} x", steps=2)[0].tobytes() == ref.tobytes()  # nothing changes on the grid
    assert pipe.edit(None, "a red ball", steps=1, size=(37, 21))[0].size == (37, 21)
    with pytest.raises(ValueError, match="size 5x21 is too small for the model"):
        pipe.edit(None, "a red ball", steps=1, size=(5, 21))


def test_the_pixel_budget_scales_large_images_down(pipe):
    small = EditPipeline(pipe.model, pipe.text_encoder, pipe.codec, max_pixels=32 * 32)
    job = small.prepare([], Turn("{image} x", *turn_inputs(demo_scene(96, 64), None)), None, 1, 1.0, 0.5, 0, "")
    assert job.target_size == (24 // 4, 32 // 4)  # 96x64 into 1024 px: 32x24, latent factor 4
    assert small.finish(job).size == (96, 64)
    with pytest.raises(ValueError, match="max_pixels must be an integer >= 1, got 0"):
        EditPipeline(pipe.model, pipe.text_encoder, pipe.codec, max_pixels=0)


def test_refusals_come_before_model_work(pipe, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("model work started before the arguments were checked")
    monkeypatch.setattr(pipe.codec, "encode", fail)
    with pytest.raises(ValueError, match="image 1: image size 1x300 is too small for the model"):
        pipe.edit([demo_scene(64, 64), Image.new("RGB", (1, 300))], "{image} x", steps=1)
    with pytest.raises(ValueError, match="resize 'fill' is not a resize mode"):
        pipe.edit(demo_scene(64, 64), "{image} x", steps=1, resize="fill")
    with pytest.raises(ValueError, match="image 0: image size 37x53 is not a multiple of patch x codec factor"):
        pipe.edit(demo_scene(37, 53), "{image} x", steps=1, resize="error")


def test_each_image_of_a_request_is_fitted_on_its_own(pipe):
    images = [demo_scene(37, 53), demo_scene(250, 100), demo_scene(64, 64)]
    masks = [None, Image.new("L", (125, 50), 255)]  # a mask of its image's aspect at half its size
    job = pipe.prepare([], Turn("{image} with {image1} and {image2}", *turn_inputs(images, masks)), None, 1, 1.0,
                       0.5, 0, "")
    frames = job.samples[0].units[-1].images
    assert [tuple(i.latent.shape[1:]) for i in frames] == [(12, 8), (24, 62), (16, 16)]
    assert frames[1].mask.shape == (24, 62) and bool(frames[1].mask.all())
    assert pipe.finish(job).size == (37, 53)


def test_session_and_server_take_any_size(pipe):
    s = EditSession(pipe)
    first = s.edit("{image} add a hat", images=[demo_scene(37, 53)], steps=1, resize="crop")
    second = s.edit("{image} now red", steps=1)  # the history keeps its crop; this turn resizes
    assert first.size == second.size == (37, 53) and s.history[0].resize == "crop"
    with EditServer(pipe, log_every=0) as server:
        img = demo_scene(250, 100)
        got = server.submit(img, "{image} x", steps=2, resize="crop").result(timeout=120)[0]
        ref = pipe.edit(img, "{image} x", steps=2, resize="crop")[0]
        assert got.size == (250, 100)
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(ref, dtype=int)).max() <= 2
        with pytest.raises(ValueError, match="60x64 is not a multiple"):
            server.submit(demo_scene(60, 64), "{image} x", steps=1, resize="error").result(timeout=60)


def test_tensor_masks_follow_their_image(pipe):
    img, mask = marked((250, 100), (150, 20, 210, 70))
    as_tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32))
    a = pipe.prepare([], Turn("{image} x", *turn_inputs(img, as_tensor), "crop"), None, 1, 1.0, 0.5, 0, "")
    b = pipe.prepare([], Turn("{image} x", *turn_inputs(img, mask), "crop"), None, 1, 1.0, 0.5, 0, "")
    assert torch.equal(a.samples[0].target.mask, b.samples[0].target.mask)
    assert 0 < float(a.samples[0].target.mask.mean()) < 0.3
