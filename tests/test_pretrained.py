"""Pipelines from real folder layouts, built here as tiny random models with the real libraries
(transformers' CLIP and T5 with their tokenizers, diffusers' AutoencoderKL and SD3Transformer2DModel) and
saved with ``save_pretrained``; diffusers' own StableDiffusion3Pipeline on the same folder is the oracle."""
import json
import re
import shutil
import string
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import randomise
from omniace.engine import build_model, get_config
from omniace.engine.lcu import unpatchify
from omniace.engine.model import load_model, save_weights
from omniace.engine.pipeline import EditPipeline, Turn
from omniace.engine.sampler import initial_noise
from omniace.engine.weights import save_safetensors
from omniace.engine.text import T5TextEncoder, TruncationWarning, indicator_table

pytestmark = pytest.mark.interop
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPT = "make the sky blue, add a red kite"
T5_CHARS = string.ascii_lowercase + string.digits + " .,!?'-{}"


def clip_tokenizer() -> "transformers.CLIPTokenizer":
    """CLIP's byte-level BPE with no merges: one token per character (every byte has a token)."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5(folder: Path, d_model: int, tokenizer: Path | None = None) -> None:
    """A T5 encoder saved in ``folder`` and its (Unigram, sentencepiece-style) tokenizer in ``tokenizer``
    (default: the same folder)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in T5_CHARS] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(tokenizer or folder)
    cfg = transformers.T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    transformers.T5EncoderModel(cfg).save_pretrained(folder)


def vae(folder: Path | None, latent_channels: int, blocks: int, groups: int = 4, width: int = 8):
    """An AutoencoderKL with downsampling factor ``2 ** (blocks - 1)`` and SD3's scaling and shift, saved in
    ``folder`` (if given) and returned."""
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
                                    up_block_types=["UpDecoderBlock2D"] * blocks, block_out_channels=[width] * blocks,
                                    layers_per_block=1, latent_channels=latent_channels, norm_num_groups=groups,
                                    sample_size=32, scaling_factor=1.5305, shift_factor=0.0609)
    if folder is not None:
        model.save_pretrained(folder)
    return model


def ldm_keys(sd: dict, blocks: int) -> dict:
    """A diffusers AutoencoderKL state dict in the LDM layout that SD 1.x and scepter save (``vae.bin``):
    ``down.{i}.block.{j}``, decoder ``up`` blocks in reverse order, ``mid.block_{k}``, ``mid.attn_1`` with 1x1-conv
    q/k/v/proj_out, ``nin_shortcut``, ``norm_out``."""
    out = {}
    for k, v in sd.items():
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                   lambda m: f"up.{blocks - 1 - int(m.group(1))}.{'block' if m.group(2) == 'resnets' else 'upsample'}.",
                   k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            k = k.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
            v = v[:, :, None, None] if v.dim() == 2 else v
        out[k] = v
    return out


def sd3_folder(root: Path, sd35: bool) -> Path:
    """A diffusers StableDiffusion3Pipeline folder: SD3 (plain MMDiT) or SD3.5 Medium's shape (MMDiT-X dual
    attention, RMS qk-norm)."""
    torch.manual_seed(1 + sd35)
    for enc, tok, hidden, proj in (("text_encoder", "tokenizer", 16, 12), ("text_encoder_2", "tokenizer_2", 24, 20)):
        clip_tokenizer().save_pretrained(root / tok)
        cfg = transformers.CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=2, num_attention_heads=2, projection_dim=proj,
                                          max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        transformers.CLIPTextModelWithProjection(cfg).save_pretrained(root / enc)
    t5(root / "text_encoder_3", 48, tokenizer=root / "tokenizer_3")
    vae(root / "vae", 4, 2)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    tr = diffusers.SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                         caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                         pos_embed_max_size=16, **extra)
    randomise(tr, seed=3, std=0.1)  # diffusers zero-initialises the output projection
    tr.save_pretrained(root / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    parts = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "text_encoder_3": ["transformers", "T5EncoderModel"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"], "image_encoder": [None, None],
             "feature_extractor": [None, None]}
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **parts}))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"sd3": sd3_folder(root / "sd3", sd35=False), "sd35": sd3_folder(root / "sd35", sd35=True)}


# (folder, T5 on, width x height, steps, guidance)
ORACLE_CASES = [("sd3", True, (48, 32), 4, 4.0), ("sd35", False, (32, 40), 3, 6.5)]


@pytest.mark.parametrize("name,use_t5,size,steps,guidance", ORACLE_CASES, ids=["sd3-t5", "sd35-no-t5"])
def test_text_to_image_matches_diffusers_pipeline(folders, name, use_t5, size, steps, guidance):
    """omniace's text-to-image path against diffusers' StableDiffusion3Pipeline on the same folder: the same
    initial latents (omniace's seeded noise), the same schedule (flow Euler, shift 3, sigmas linspace(1, 0)
    before the shift), CFG with the empty negative prompt, no guidance rescale.

    Tolerance: final latents and decoded images within 1e-4 (fp32; measured ~1e-6), the 8-bit images within
    one level (rounding of values a float ulp apart)."""
    folder = folders[name]
    pipe = EditPipeline.from_pretrained(folder, t5=use_t5)
    assert (pipe.text_encoder.t5 is not None) == use_t5
    assert pipe.cfg.dual_attention_layers == ((0,) if name == "sd35" else ())
    w, h = size
    f, p, seed = pipe.codec.factor, pipe.cfg.patch_size, 11
    # the user path: PIL out
    ours_pil = np.asarray(pipe.edit(None, PROMPT, size=size, steps=steps, guidance=guidance, rescale=0.0,
                                    seed=seed)[0])
    # the same path step by step, for the latent and the float image
    job = pipe.prepare([], Turn(PROMPT, [], []), size, steps, guidance, 0.0, seed, "")
    batch = pipe.pack(job.samples)
    while not job.done:
        x, t = job.model_input()
        job.advance(pipe.model(batch, x, t))
    ours_lat = unpatchify(job.x, h // f, w // f, p)
    ours_img = pipe.codec.decode(ours_lat)

    kw = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, **kw)
    ref.set_progress_bar_config(disable=True)
    latents = unpatchify(initial_noise([(h // f, w // f)], p, seed, 4), h // f, w // f, p)[None]
    final = {}

    def keep(_pipe, _i, _t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        out = ref(PROMPT, negative_prompt="", height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
                  latents=latents, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist(), output_type="pt",
                  callback_on_step_end=keep).images[0]
    lat_err = (ours_lat - final["latents"][0]).abs().max().item()
    img_err = (ours_img - (out * 2 - 1)).abs().max().item()
    ref_pil = (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
    print(f"{name}: max |latent error| {lat_err:.2e}, max |image error| {img_err:.2e} (of [-1, 1])")
    assert lat_err < 1e-4 and img_err < 1e-4
    assert final["latents"][0].abs().max() > 0.1 and out.std() > 1e-3  # not a degenerate image
    assert np.abs(ours_pil.astype(int) - ref_pil.astype(int)).max() <= 1


def test_sd3_prompt_embedding_layout_and_truncation(folders):
    """SD3's embedding: 77 CLIP rows (CLIP-L 16 + CLIP-G 24 channels, zero-padded to T5's 48) then 256 T5 rows;
    pooled = both projections (12 + 20). Text past CLIP's 77 tokens is cut with a warning naming the tail,
    or refused."""
    pipe = EditPipeline.from_pretrained(folders["sd3"])
    enc = pipe.text_encoder.encode(["a cat"])[0]
    assert enc.tokens.shape == (77 + 256, 48) and enc.pooled.shape == (32,)
    assert enc.tokens[:77, 40:].abs().max() == 0 and enc.tokens[:77, :40].abs().max() > 0
    assert enc.tokens[77:].abs().max() > 0
    long = "x" * 75 + " tail"  # 75 + 4 characters + the two specials: over 77
    with pytest.warns(TruncationWarning, match=r"CLIP tokens; SD3TextEncoder keeps 77: dropped 'tail'"):
        pipe.text_encoder.encode([long])
    with pytest.raises(ValueError, match="it would drop 'tail'"):
        pipe.text_encoder.encode([long], truncate=False)
    no_t5 = EditPipeline.from_pretrained(folders["sd3"], t5=False).text_encoder.encode(["a cat"])[0]
    assert torch.equal(no_t5.tokens[:77], enc.tokens[:77]) and no_t5.tokens[77:].abs().max() == 0


def test_sd3_folder_with_editnet_weights(folders, tmp_path):
    """An EditNet weights file (a trainer-style export of the whole SD3 + EditNet model) on an SD3.5 folder:
    its EditNet tensors are the pipeline's, and an edit keeps its input's size."""
    folder = folders["sd35"]
    base = EditPipeline.from_pretrained(folder)
    model = build_model(replace(base.cfg, editnet=True))
    model.load_state_dict({**model.state_dict(), **base.model.state_dict()})
    randomise(model.editnet, seed=9)
    save_weights(model.state_dict(), model.cfg, tmp_path / "editnet.safetensors")
    pipe = EditPipeline.from_pretrained(folder, tmp_path / "editnet.safetensors")
    got = pipe.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    src = Image.fromarray((np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8))
    out = pipe.edit(src, "make it red", steps=2, seed=1)[0]
    assert out.size == (40, 24) and np.asarray(out).std() > 0
    # only EditNet tensors: a file without them, or describing another model, is refused by name
    save_weights({"editnet.x": torch.ones(1)}, get_config("sd3-tiny-editnet"), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"other.safetensors: its omniace_config differs .* in_channels \(48 there"):
        EditPipeline.from_pretrained(folder, tmp_path / "other.safetensors")
    save_weights(base.model.state_dict(), base.cfg, tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match=r"base.safetensors: .* differs .* in editnet \(False there, True here\)"):
        EditPipeline.from_pretrained(folder, tmp_path / "base.safetensors")
    save_safetensors(base.model.state_dict(), tmp_path / "plain.safetensors")  # no config to compare
    with pytest.raises(ValueError, match="plain.safetensors: no editnet.. tensors"):
        EditPipeline.from_pretrained(folder, tmp_path / "plain.safetensors")


def test_sd3_folder_refusals(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        EditPipeline.from_pretrained(tmp_path / "nowhere")
    bad = tmp_path / "flux"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="a 'FluxPipeline' folder; expected a StableDiffusion3Pipeline"):
        EditPipeline.from_pretrained(bad)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(FileNotFoundError, match="lacks transformer, vae, text_encoder, tokenizer"):
        EditPipeline.from_pretrained(bad)
    with pytest.raises(ValueError, match="preset='ace-tiny' is for ACE folders"):
        EditPipeline.from_pretrained(folders["sd3"], preset="ace-tiny")
    other = shutil.copytree(folders["sd3"], tmp_path / "shift1")
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: FlowMatchEulerDiscreteScheduler with shift 1.0, "
                                         r"use_dynamic_shifting False; the engine samples SD3 with .* shift 3.0"):
        EditPipeline.from_pretrained(other)
    shutil.rmtree(other / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match=r"shift1' lacks text_encoder_3; expected a diffusers"):
        EditPipeline.from_pretrained(other, t5=True)  # T5 asked for, not there


def scepter_keys(sd: dict) -> dict:
    """The engine's ACE keys in the released checkpoint's layout (fused qkv / kv, ``proj``, ``y_proj``, the
    wrapper's ``model.`` prefix; the indicator table unfilled, as released)."""
    out = {"text_position_embeddings.pos": torch.zeros_like(sd["text_position_embeddings.pos"])}
    for k, v in sd.items():
        if k.startswith("text_position") or any(p in k for p in (".attn.k.", ".attn.v.", ".cross_attn.v.")):
            continue  # the table above; k and v go into the fused tensors below
        if ".attn.q." in k:
            k, v = k.replace(".attn.q.", ".attn.qkv."), torch.cat([v, sd[k.replace(".q.", ".k.")],
                                                                  sd[k.replace(".q.", ".v.")]])
        elif ".cross_attn.k." in k:
            k, v = k.replace(".cross_attn.k.", ".cross_attn.kv_linear."), torch.cat([v, sd[k.replace(".k.", ".v.")]])
        else:
            k = (k.replace(".cross_attn.q.", ".cross_attn.q_linear.").replace(".cross_attn.o.", ".cross_attn.proj.")
                 .replace(".attn.o.", ".attn.proj.").replace("y_embedder.", "y_embedder.y_proj."))
        out["model." + k] = v
    return out


def ace_folder(root: Path, model, release: bool = False):
    """An ACE folder: flat (dit/, text_encoder/ with its tokenizer, vae/) or, with ``release``, the release's
    layout (models/dit/, models/text_encoder/t5-v1_1-xxl/, models/tokenizer/t5-v1_1-xxl/, models/vae/vae.bin).
    Returns the folder and its VAE."""
    base = root / "models" if release else root
    (base / "dit").mkdir(parents=True)
    torch.save(scepter_keys(model.state_dict()), base / "dit" / "ace_tiny.pth")
    if release:
        t5(base / "text_encoder" / "t5-v1_1-xxl", model.cfg.y_channels, tokenizer=base / "tokenizer" / "t5-v1_1-xxl")
    else:
        t5(base / "text_encoder", model.cfg.y_channels)
    if release:  # scepter's LDM-layout VAE file; LDM's GroupNorm has 32 groups
        ldm = vae(None, model.cfg.in_channels, 3, groups=32, width=32)
        (base / "vae").mkdir()
        torch.save(ldm_keys(ldm.state_dict(), 3), base / "vae" / "vae.bin")
        return root, ldm
    return root, vae(base / "vae", model.cfg.in_channels, 3)  # factor 4, as ace-tiny's codec


def test_ace_folder_with_a_released_style_checkpoint(tmp_path):
    """An ACE folder in the release's layout (models/, nested T5 and tokenizer folders) whose DiT is a
    scepter-layout .pth and whose VAE is an LDM-layout vae.bin: the conversions restore every weight, the unfilled
    indicator table is filled from T5 (as scepter does), and an edit keeps its input's size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomise(build_model(get_config("ace-tiny")), seed=4)
        folder, ldm = ace_folder(tmp_path / "ace", model, release=True)
    pipe = EditPipeline.from_pretrained(folder, preset="ace-tiny")
    # the LDM-layout vae.bin converted by diffusers: every weight back, ACE's scaling factor
    vae_sd = pipe.codec.vae.state_dict()
    assert vae_sd.keys() == ldm.state_dict().keys()
    assert all(torch.equal(vae_sd[k], v) for k, v in ldm.state_dict().items())
    assert pipe.codec.scale == 0.18215 and pipe.codec.factor == 4
    got = pipe.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items() if k != "text_position_embeddings.pos")
    text = T5TextEncoder(folder / "models" / "text_encoder" / "t5-v1_1-xxl", dtype=torch.float32,
                         tokenizer=folder / "models" / "tokenizer" / "t5-v1_1-xxl")
    table = indicator_table(text)
    assert table.abs().max() > 0 and torch.equal(got["text_position_embeddings.pos"], table)
    src = Image.fromarray((np.random.default_rng(1).random((16, 24, 3)) * 255).astype(np.uint8))
    out = pipe.edit(src, "make {image} brighter", steps=2, seed=0)[0]
    assert out.size == (24, 16) and np.asarray(out).std() > 0
    with pytest.raises(ValueError, match=r"the VAE has 48 latent channels, the DiT takes 4"):
        EditPipeline.from_pretrained(folder)  # ace-0.6b-512's config for a tiny checkpoint
    (folder / "models" / "dit" / "second.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected one DiT checkpoint .* found \['dit/ace_tiny.pth', "
                                         r"'dit/second.safetensors'\]"):
        EditPipeline.from_pretrained(folder, preset="ace-tiny")
    (folder / "models" / "dit" / "second.safetensors").unlink()
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, folder / "models" / "vae" / "other.bin")
    with pytest.raises(ValueError, match=r"expected one VAE checkpoint .* in vae/, found \['vae/other.bin', "
                                         r"'vae/vae.bin'\]"):
        EditPipeline.from_pretrained(folder, preset="ace-tiny")


def test_convert_writes_weights_that_edit_loads_with_no_further_flags(tmp_path, capsys):
    """``omniace convert`` of a released-style ACE .pth writes the config into the file; ``omniace edit`` then
    loads it with only --text-encoder and --vae (no --preset)."""
    from omniace.engine.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomise(build_model(get_config("ace-tiny")), seed=5)
        folder, _ = ace_folder(tmp_path / "ace", model)
    out = tmp_path / "ace-tiny.safetensors"
    main(["convert", str(folder / "dit" / "ace_tiny.pth"), str(out), "--preset", "ace-tiny"])
    assert f"tensors to {out}" in capsys.readouterr().out
    loaded = load_model(out)  # no config given: the file's own
    assert loaded.cfg == get_config("ace-tiny")
    # without --preset: the ace preset whose shapes it fits (ace-tiny, of ace-0.6b, ace-small, ace-tiny)
    main(["convert", str(folder / "dit" / "ace_tiny.pth"), str(tmp_path / "inferred.safetensors")])
    assert load_model(tmp_path / "inferred.safetensors").cfg == get_config("ace-tiny")
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items() if k != "text_position_embeddings.pos")
    Image.fromarray((np.random.default_rng(2).random((16, 24, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    main(["edit", "--weights", str(out), "--text-encoder", str(folder / "text_encoder"), "--vae", str(folder / "vae"),
          "--image", str(tmp_path / "in.png"), "--instruction", "brighter", "--steps", "2", "--out",
          str(tmp_path / "o.png")])
    assert Image.open(tmp_path / "o.png").size == (24, 16)
    # the converted file in an ACE folder: its own config, so a VAE of another factor is refused
    (folder / "dit" / "ace_tiny.pth").unlink()
    out.rename(folder / "dit" / out.name)
    assert EditPipeline.from_pretrained(folder).cfg == get_config("ace-tiny")
    vae(tmp_path / "vae2", 48, 2)
    (folder / "vae").rename(tmp_path / "vae4")
    (tmp_path / "vae2").rename(folder / "vae")
    with pytest.raises(ValueError, match=r"ace-tiny.safetensors was made for a VAE of factor 4; .*vae has factor 2"):
        EditPipeline.from_pretrained(folder)


def test_convert_a_diffusers_transformer_folder_and_refusals(folders, tmp_path, capsys):
    """An SD3.5 diffusers transformer folder converts with its config.json as the config; a preset of another
    family, or a checkpoint that does not fit its preset, is refused and nothing is written."""
    from omniace.engine.cli import main
    from omniace.engine.interop import sd3_from_diffusers
    from omniace.engine.weights import load_diffusers_folder

    out = tmp_path / "sd35.safetensors"
    main(["convert", str(folders["sd35"] / "transformer"), str(out), "--family", "sd3"])
    config, sd = load_diffusers_folder(folders["sd35"] / "transformer")
    want = sd3_from_diffusers(config, sd)
    loaded = load_model(out)
    assert loaded.cfg == want.cfg and loaded.cfg.dual_attention_layers == (0,) and loaded.cfg.qk_norm == "rms_norm"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.state_dict().items())
    # a base sd3-small file: its preset found by shape (sd3-small-controlnet without its branch is the same model)
    base = build_model(get_config("sd3-small"))
    torch.save(base.state_dict(), tmp_path / "small.pth")
    main(["convert", str(tmp_path / "small.pth"), str(tmp_path / "small.safetensors"), "--family", "sd3"])
    assert load_model(tmp_path / "small.safetensors").cfg == get_config("sd3-small")
    pth = tmp_path / "ace.pth"
    torch.save({"x_embedder.proj.weight": torch.zeros(8, 5, 2, 2)}, pth)
    for argv, message in (
        ([str(pth), str(tmp_path / "a.safetensors"), "--preset", "sd3-tiny-editnet"],
         "preset 'sd3-tiny-editnet' is a 'sd3' model; --family ace needs a preset of that family"),
        ([str(pth), str(tmp_path / "a.safetensors"), "--preset", "ace-tiny"],
         r"ace.pth: checkpoint does not fit ACEModel: \d+ missing: .* shape mismatches: \['x_embedder.proj.weight"),
        ([str(folders["sd35"] / "transformer"), str(tmp_path / "a.safetensors")], "is a folder: only --family sd3"),
        ([str(pth), str(tmp_path / "a.safetensors")], r"ace.pth: fits no ace preset; name its config with --preset"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(["convert", *argv])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and re.search(message, err), err
        assert not (tmp_path / "a.safetensors").exists()


def test_a_trainer_export_folder(tmp_path):
    """A trainer's output folder loads through from_pretrained: a pixel-space export with the built-in codec and
    text encoder (the same pipeline as EditPipeline.pretrained on its file); a latent-space one without vae/ is
    refused naming the folder it needs."""
    from omniace.engine.config import get_config
    from omniace.engine.model import build_model, save_model
    from omniace.engine.pipeline import DEFAULT_WEIGHTS, EditPipeline

    (tmp_path / "pixel").mkdir()
    (tmp_path / "pixel" / "model.safetensors").write_bytes(DEFAULT_WEIGHTS.read_bytes())
    pipe = EditPipeline.from_pretrained(tmp_path / "pixel")
    src = Image.new("RGB", (40, 24), (200, 40, 40))
    want = EditPipeline.pretrained().edit(src, "{image} make it blue", steps=2, guidance=1.5, seed=3)[0]
    assert pipe.edit(src, "{image} make it blue", steps=2, guidance=1.5, seed=3)[0].tobytes() == want.tobytes()
    (tmp_path / "latent").mkdir()
    save_model(build_model(get_config("sd3-tiny-editnet", in_channels=16, out_channels=16, codec_factor=8)),
               tmp_path / "latent" / "model.safetensors")
    with pytest.raises(ValueError, match=r"needs its VAE in vae/"):
        EditPipeline.from_pretrained(tmp_path / "latent")
    with pytest.raises(ValueError, match="trainer export folder"):
        EditPipeline.from_pretrained(tmp_path / "pixel", preset="ace-0.6b-512")
