"""diffusers' SD3Transformer2DModel is the oracle for the SD3 family (and for EditNet's zero start)."""
import pytest
import torch

from omniace.engine.interop import sd3_forward, sd3_from_diffusers

pytestmark = pytest.mark.interop

CONFIG = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
              num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
              pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16)


def _diffusers_model(qk_norm=None):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.SD3Transformer2DModel(**CONFIG, qk_norm=qk_norm).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-zero everywhere (diffusers zero-inits nothing we rely on)
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.5))
    return model


def _inputs():
    g = torch.Generator().manual_seed(4)
    return (torch.randn(2, 4, 6, 10, generator=g), torch.randn(2, 7, 20, generator=g),
            torch.randn(2, 12, generator=g), torch.tensor([813.0, 97.5]))


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd3_matches_diffusers(qk_norm):
    ref = _diffusers_model(qk_norm)
    x, ctx, pooled, t = _inputs()  # non-square latent 6x10
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        ours = sd3_from_diffusers(dict(ref.config), ref.state_dict())
        got = sd3_forward(ours, x, ctx, pooled, t)
    assert got.shape == want.shape
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 1e-5, f"max relative error {rel:.2e}"


def test_fresh_editnet_leaves_base_output_unchanged():
    ref = _diffusers_model()
    x, ctx, pooled, t = _inputs()
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        ours = sd3_from_diffusers(dict(ref.config), ref.state_dict(), editnet=True)
        got = sd3_forward(ours, x, ctx, pooled, t)
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    # and the control copies start equal to their base blocks
    for ctrl, blk in zip(ours.editnet.blocks, ours.transformer_blocks):
        for (n, a), (_, b) in zip(ctrl.state_dict().items(), blk.state_dict().items()):
            assert torch.equal(a, b), n
