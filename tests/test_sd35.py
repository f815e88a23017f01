"""SD3.5: MMDiT-X dual attention (Medium) and RMS qk-norm (Large) against diffusers' SD3Transformer2DModel."""
import pytest
import torch

from helpers import randomise
from omniace.engine.cli import main
from omniace.engine.config import SD3Config, config_from_dict, config_to_dict, get_config
from omniace.engine.interop import sd3_config_from_diffusers, sd3_from_diffusers
from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack
from omniace.engine.model import build_model, count_parameters

pytestmark = pytest.mark.interop

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=3,
            joint_attention_dim=20, caption_projection_dim=24, pooled_projection_dim=12, out_channels=4,
            pos_embed_max_size=16)
MEDIUM = dict(TINY, dual_attention_layers=(0, 1), qk_norm="rms_norm")  # SD3.5 Medium's shape of config
LARGE = dict(TINY, qk_norm="rms_norm")


def _diffusers(config: dict):
    diffusers = pytest.importorskip("diffusers")
    return randomise(diffusers.SD3Transformer2DModel(**config).eval(), seed=5)  # RMSNorm weights included


def _samples(sizes):
    g = torch.Generator().manual_seed(6)
    return [(torch.randn(4, h, w, generator=g), torch.randn(n, 20, generator=g), torch.randn(12, generator=g))
            for (h, w), n in sizes]


@pytest.mark.parametrize("config", [MEDIUM, LARGE, dict(MEDIUM, dual_attention_layers=(2,), qk_norm=None)],
                         ids=["medium", "large", "dual-last-block"])
def test_sd35_packed_batch_matches_diffusers(config):
    """One packed batch of mixed sizes (latent grids 6x10, 4x4, 8x6; 7, 3, 5 text tokens) against diffusers
    run on each sample alone, fp32."""
    ref = _diffusers(config)
    data = _samples([((6, 10), 7), ((4, 4), 3), ((8, 6), 5)])
    t = torch.tensor([813.0, 97.5, 420.0])
    ours = sd3_from_diffusers(dict(ref.config), ref.state_dict())
    assert ours.cfg.dual_attention_layers == tuple(config.get("dual_attention_layers", ()))
    samples = [LCUSample([ConditionUnit("", [], text=txt, pooled=pooled)], ImageInput(lat)) for lat, txt, pooled in data]
    batch = pack(samples, 2, codec_factor=8, with_mask=False)
    with torch.no_grad():
        got = batch.targets_from_tokens(ours(batch, batch.target_tokens(), t))
        for b, (lat, txt, pooled) in enumerate(data):
            want = ref(hidden_states=lat[None], encoder_hidden_states=txt[None], pooled_projections=pooled[None],
                       timestep=t[b:b + 1]).sample[0]
            rel = (got[b] - want).abs().max() / want.abs().max()
            assert rel < 1e-5, f"sample {b}: max relative error {rel:.2e}"


def test_editnet_on_sd35_base_starts_as_the_base_and_learns():
    """EditNet's control copies of dual-attention blocks run over condition + target tokens (a condition of
    another size than the target); zero-initialised injections leave the SD3.5 base's output unchanged, and once
    they are non-zero the output depends on the branch, its attn2 included."""
    ref = _diffusers(MEDIUM)
    base = sd3_from_diffusers(dict(ref.config), ref.state_dict())
    edit = sd3_from_diffusers(dict(ref.config), ref.state_dict(), editnet=True)
    assert all(edit.editnet.blocks[i].attn2 is not None for i in (0, 1)) and edit.editnet.blocks[2].attn2 is None
    (lat, txt, pooled), (cond, _, _) = _samples([((6, 10), 7), ((4, 8), 1)])  # condition: another size
    t = torch.tensor([500.0])
    with torch.no_grad():
        plain = pack([LCUSample([ConditionUnit("", [], text=txt, pooled=pooled)], ImageInput(lat))], 2,
                     codec_factor=8, with_mask=False)
        want = base(plain, plain.target_tokens(), t)
        batch = pack([LCUSample([ConditionUnit("", [ImageInput(cond)], text=txt, pooled=pooled)], ImageInput(lat))],
                     2, codec_factor=8, with_mask=False)
        got = edit(batch, batch.target_tokens(), t)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
        torch.nn.init.normal_(edit.editnet.cond_embed.proj.weight, std=0.2)
        for lin in edit.editnet.img_inject:
            torch.nn.init.normal_(lin.weight, std=0.2)
        changed = edit(batch, batch.target_tokens(), t)
        edit.editnet.blocks[0].attn2.to_out[0].weight.mul_(2)  # the control copy's attn2 is on the path
        again = edit(batch, batch.target_tokens(), t)
    assert (changed - want).abs().max() > 1e-3 and (again - changed).abs().max() > 1e-4


@pytest.mark.parametrize("preset,published", [
    ("sd35-medium-editnet", dict(num_layers=24, num_attention_heads=24, attention_head_dim=64,
                                 caption_projection_dim=1536, pos_embed_max_size=384, qk_norm="rms_norm",
                                 dual_attention_layers=list(range(13)))),
    ("sd35-large-editnet", dict(num_layers=38, num_attention_heads=38, attention_head_dim=64,
                                caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm",
                                dual_attention_layers=[])),
])
def test_sd35_presets_have_the_published_shapes(preset, published):
    """The presets' base (EditNet off) has exactly diffusers' parameter names and shapes for the published
    transformer/config.json of stabilityai/stable-diffusion-3.5-medium / -large (built on the meta device)."""
    diffusers = pytest.importorskip("diffusers")
    config = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=4096,
                  pooled_projection_dim=2048, **published)
    cfg = get_config(preset)
    assert sd3_config_from_diffusers(config, editnet=True) == cfg
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**config)
        ours = build_model(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    base = {k: tuple(v.shape) for k, v in ours.base_state_dict().items()}
    assert base == want
    n_base = count_parameters(ref)
    assert count_parameters(ours) > 1.9 * n_base  # EditNet: a copy of every block on top of the base
    # published sizes: SD3.5 Medium's MMDiT-X 2.5B, Large's MMDiT 8.1B (transformer only, rounded)
    assert round(n_base / 1e9, 1) == {"sd35-medium-editnet": 2.2, "sd35-large-editnet": 8.1}[preset]


def test_dual_attention_config_is_checked_and_round_trips():
    cfg = SD3Config(num_layers=4, dual_attention_layers=[0, 2])  # a JSON list becomes a tuple
    assert cfg.dual_attention_layers == (0, 2)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    for bad in ([4], [-1], [1, 1]):
        with pytest.raises(ValueError, match=r"dual_attention_layers .* distinct block indices in \[0, 4\)"):
            SD3Config(num_layers=4, dual_attention_layers=bad)


@pytest.mark.parametrize("preset,params", [("sd35-medium-editnet", "preset sd35-medium-editnet: "),
                                           ("sd35-large-editnet", "preset sd35-large-editnet: ")])
def test_info_for_sd35_presets(preset, params, capsys):
    cfg = get_config(preset)
    with torch.device("meta"):
        n = count_parameters(build_model(cfg))
    main(["info", "--preset", preset, "--resolution", "1024"])
    out = capsys.readouterr().out
    assert f"{params}{n:,} parameters" in out
    assert "8192 image tokens" in out  # 1024 px / (8 x 2) = 64 x 64 target + condition tokens
