"""The one image decoder: EXIF orientation, high bit depth, every mode to RGB, and the same pixels as DALI."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from omniace.engine.imageio import decode_image, decode_rgb_array

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


def png_rgb16(a: np.ndarray) -> bytes:
    """uint16 [H, W, 3] as a 16-bit colour PNG (Pillow cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def halves(w: int = 64, h: int = 32) -> np.ndarray:
    """Left half red, right half blue, a green marker at the top-left pixel."""
    x = np.zeros((h, w, 3), np.uint8)
    x[:, : w // 2], x[:, w // 2:], x[0, 0] = RED, BLUE, GREEN
    return x


def grey16() -> np.ndarray:
    g = np.full((32, 64), 100 * 257, np.uint16)
    g[0, :4] = [0, 128, 127 * 257 + 200, 65535]
    return g


def cases() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """One encoded image per case (bytes, displayed width x height), every one stored as 64x32."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 64, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (32, 64, 1)).astype(np.uint8)
    pal = Image.fromarray(x).quantize(16)
    cmyk = rng.integers(0, 256, (32, 64, 4)).astype(np.uint8)
    rgb16 = rng.integers(0, 65536, (32, 64, 3)).astype(np.uint16)
    f = rng.uniform(-0.2, 1.2, (32, 64)).astype(np.float32)
    wide, tall = (64, 32), (32, 64)
    return {
        "jpeg": (enc(Image.fromarray(halves()), "JPEG", quality=95), wide),
        "jpeg_exif6": (enc(Image.fromarray(halves()), "JPEG", quality=95, exif=exif(6)), tall),
        "png_exif8": (enc(Image.fromarray(x), "PNG", exif=exif(8)), tall),
        "png_grey16": (enc(Image.fromarray(grey16()), "PNG"), wide),
        "png_rgb16": (png_rgb16(rgb16), wide),
        "png_rgba": (enc(Image.fromarray(np.concatenate([x, alpha], -1), "RGBA"), "PNG"), wide),
        "png_la": (enc(Image.fromarray(np.concatenate([x[..., :1], alpha], -1), "LA"), "PNG"), wide),
        "png_p_transparency": (enc(pal, "PNG", transparency=0), wide),
        "jpeg_cmyk": (enc(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95), wide),
        "tiff_cmyk": (enc(Image.fromarray(cmyk, "CMYK"), "TIFF"), wide),  # DALI cannot read it: PIL decides
        "tiff_grey16": (enc(Image.fromarray(grey16()), "TIFF"), wide),
        "pgm_grey16": (enc(Image.fromarray(grey16()), "PPM"), wide),  # Pillow opens it as mode "I"
        "tiff_float": (enc(Image.fromarray(f), "TIFF"), wide),
        "gif": (enc(pal, "GIF"), wide),  # DALI cannot read GIF: PIL decides
        "webp_exif6": (enc(Image.fromarray(x), "WEBP", lossless=True, exif=exif(6)), tall),  # nor WebP + EXIF
        "tiff_lab": (enc(Image.fromarray(x).convert("LAB"), "TIFF"), wide),  # refused by both
        "tiff_int32": (enc(Image.fromarray(rng.integers(0, 1 << 20, (32, 64)).astype(np.int32)), "TIFF"), wide),
        "png_truncated": (enc(Image.fromarray(x), "PNG")[:200], wide),
    }


REFUSED = {"tiff_lab": "mode 'LAB'", "png_truncated": "cannot decode",
           # 'I' is read only from PNG/PPM (16-bit grey); the message must not list it as supported outright
           "tiff_int32": r"TIFF image mode 'I' is not supported; expected one of \((?:(?!'I').)*\), or mode 'I' from a PNG "
                         r"or PPM file"}


def test_exif_orientation_is_applied():
    # the instance: a 64x32 JPEG tagged Orientation=6 (turn 90 degrees clockwise to display)
    jpeg = decode_rgb_array(enc(Image.fromarray(halves()), "JPEG", quality=95, exif=exif(6)))
    assert jpeg.shape == (64, 32, 3)
    assert np.abs(jpeg[8:28].astype(int) - RED).max() <= 8 and np.abs(jpeg[36:56].astype(int) - BLUE).max() <= 8
    # lossless, pixel-exact: where the stored top-left marker lands for 6, 3 and 8
    for orientation, shape, marker, top in [(6, (64, 32), (0, 31), RED), (3, (32, 64), (31, 63), BLUE),
                                            (8, (64, 32), (63, 0), BLUE)]:
        a = decode_rgb_array(enc(Image.fromarray(halves()), "PNG", exif=exif(orientation)))
        assert a.shape[:2] == shape and [tuple(p) for p in np.argwhere((a == GREEN).all(-1))] == [marker]
        assert tuple(a[1, 1]) == top


def test_sixteen_bit_grey_is_scaled_not_clipped():
    # the instance: 100*257 came out white (255); scaled it is 100. round(v / 257) elsewhere.
    for fmt in ("PNG", "TIFF", "PPM"):
        a = decode_rgb_array(enc(Image.fromarray(grey16()), fmt))
        assert a[0, :4, 0].tolist() == [0, 0, 128, 255] and (a[1:] == 100).all()
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([100 * 257, 200 * 257], ">u2").tobytes())
    assert decode_rgb_array(big_endian)[0, :, 1].tolist() == [100, 200]


def test_sixteen_bit_colour_keeps_the_high_byte():
    a = np.zeros((8, 16, 3), np.uint16)
    a[0, 0] = [100 * 257 + 200, 1000, 65535]
    assert decode_rgb_array(png_rgb16(a))[0, 0].tolist() == [101, 3, 255]  # v >> 8, not clipped to 255


def test_alpha_and_transparency_are_dropped_not_composited():
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 128]]], np.uint8)
    assert decode_rgb_array(enc(Image.fromarray(rgba, "RGBA"), "PNG")).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    la = np.array([[[77, 0], [5, 255]]], np.uint8)
    assert decode_rgb_array(enc(Image.fromarray(la, "LA"), "PNG")).tolist() == [[[77] * 3, [5] * 3]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([9, 8, 7, 1, 2, 3])
    pal.putpixel((1, 0), 1)
    assert decode_rgb_array(enc(pal, "PNG", transparency=0)).tolist() == [[[9, 8, 7], [1, 2, 3]]]


def test_cmyk_uses_dalis_formula():
    cmyk = np.array([[[100, 0, 255, 50], [0, 0, 0, 0]]], np.uint8)
    # floor((255 - c) * (255 - k) / 255): 155 * 205 / 255 = 124.6 -> 124 (Pillow's convert rounds to 125)
    assert decode_rgb_array(enc(Image.fromarray(cmyk, "CMYK"), "TIFF")).tolist() == [[[124, 205, 0], [255] * 3]]


def test_float_images_read_as_zero_to_one():
    f = np.array([[0.5, -1.0, 2.0, np.nan, 0.25, 1.0]], np.float32)
    assert decode_rgb_array(enc(Image.fromarray(f), "TIFF"))[0, :, 0].tolist() == [128, 0, 255, 0, 64, 255]


def test_other_modes_and_bad_data_are_refused_naming_what_and_why(tmp_path):
    for name, expected in REFUSED.items():
        with pytest.raises(ValueError, match=rf"^{name}: .*{expected}"):
            decode_image(cases()[name][0], name)
    with pytest.raises(ValueError, match="mode 'HSV'"):
        decode_image(Image.new("HSV", (4, 4)), "an HSV image")
    with pytest.raises(ValueError, match=r"--image nope\.png: cannot decode"):
        decode_image(tmp_path / "nope.png", "--image nope.png")


def test_paths_and_pil_images_decode_like_bytes(tmp_path):
    blob = enc(Image.fromarray(halves()), "PNG", exif=exif(6))
    (tmp_path / "a.png").write_bytes(blob)
    ref = decode_rgb_array(blob)
    assert ref.dtype == np.uint8 and ref.shape == (64, 32, 3)
    assert np.array_equal(decode_rgb_array(tmp_path / "a.png"), ref)
    assert np.array_equal(decode_rgb_array(str(tmp_path / "a.png")), ref)
    assert np.array_equal(decode_rgb_array(Image.open(io.BytesIO(blob))), ref)
    assert decode_image(Image.fromarray(grey16())).getpixel((5, 5)) == (100, 100, 100)


# ----- DALI: the same pixels, the same refusals, the same batches -----

def _whats(blobs):
    return [f"case{i}" for i in range(len(blobs))]


def test_dali_decodes_every_case_like_decode_image():
    pytest.importorskip("nvidia.dali")
    from omniace.train.data import DALIDecoder, PILDecoder

    names, items = zip(*cases().items())
    blobs = [b for b, _ in items]
    dali, pil = DALIDecoder(None, batch_size=4)(blobs, list(names)), PILDecoder()(blobs, list(names))
    for name, (_, (w, h)), d, p in zip(names, items, dali, pil):
        if name in REFUSED:
            assert isinstance(d, ValueError) and str(d) == str(p), name
        else:
            assert d.shape == (h, w, 3) and np.array_equal(d, p), name
    # DALI's own reading of 16-bit colour rounds v / 257, within 1 of Pillow's v >> 8: the loader sends these
    # PNGs (and what DALI cannot read) to decode_image, and only these
    blob = cases()["png_rgb16"][0]
    diff = np.abs(DALIDecoder(None)._run([blob])[0].astype(int) - decode_rgb_array(blob))
    assert diff.max() == 1 and diff.mean() < 0.6
    routed = {n for n, (b, _) in zip(names, items)
              if n not in REFUSED and DALIDecoder.for_pil(Image.open(io.BytesIO(b)), b)}
    assert routed == {"png_rgb16", "gif", "tiff_cmyk"}


def test_dali_and_pil_loaders_agree_on_a_shard_of_every_case(tmp_path):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("pyarrow")
    from omniace.engine.text import TinyTextEncoder
    from omniace.train.data import DataConfig, EditLoader
    from omniace.train.omniedit_format import write_shard

    plain = {size: enc(Image.new("RGB", size, (90, 160, 30)), "PNG") for size in [(64, 32), (32, 64)]}
    rows = [{"omni_edit_id": name, "task": "style_transfer", "src_img": {"bytes": blob, "path": None},
             "edited_img": {"bytes": plain[size], "path": None}, "edited_prompt_list": ["paint it"],
             "width": size[0], "height": size[1], "sc_score_1": 9, "sc_score_2": 9, "sc_reasoning": "",
             "pq_score": 9, "pq_reasoning": "", "o_score": 9.5, "mask_img": None, "history": None,
             "specialist": None, "failure": None} for name, (blob, size) in cases().items()]
    write_shard(rows, tmp_path / "cases.parquet")
    enc_text = TinyTextEncoder(32, max_len=16)

    def run(decoder):
        skipped = []
        # 64 tokens per record (two 64x32 images at 8 pixels per token): one record per batch
        loader = EditLoader(DataConfig([str(tmp_path)], token_budget=64, decoder=decoder),
                            lambda t: [e.tokens for e in enc_text.encode(t)], log=lambda m: None,
                            on_skip=skipped.append)
        batches, it = [], iter(loader)
        while loader.stats["records"] < 2 * len(rows):
            batches.append(next(it))
        return loader, batches, skipped

    (dali, a, skip_a), (pil, b, skip_b) = run("dali"), run("pil")
    assert dali.decoder.name == "dali" and pil.decoder.name == "pil"
    assert [x.ids for x in a] == [x.ids for x in b] and dali.stats == pil.stats and skip_a == skip_b
    assert all(torch.equal(x.packed.tokens, y.packed.tokens) for x, y in zip(a, b))
    yielded = {i for x in a for i in x.ids}
    assert yielded == set(cases()) - set(REFUSED)
    assert {s["id"] for s in skip_a} == set(REFUSED) and {s["kind"] for s in skip_a} == {"corrupt_image"}
