"""scepter 1.4.1's ACE backbone is the oracle: load its random weights into ours and match its output."""
import sys
import types

import pytest
import torch

from omniace.engine.interop import ace_forward, ace_from_scepter

pytestmark = pytest.mark.interop


def _flash_attn_varlen_stub(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                            softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False, **_):
    """CPU stand-in for flash_attn_varlen_func, written independently of omniace (fp32 math)."""
    assert not causal and dropout_p == 0.0
    scale = softmax_scale or q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    for s in range(cu_seqlens_q.numel() - 1):
        a, b = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        c, d = int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1])
        att = torch.einsum("qhd,khd->hqk", q[a:b].double(), k[c:d].double()) * scale
        out[a:b] = torch.einsum("hqk,khd->qhd", att.softmax(-1), v[c:d].double()).to(q.dtype)
    return out


@pytest.fixture(scope="module")
def scepter_ace():
    pytest.importorskip("einops")
    pytest.importorskip("yaml")
    stub = types.ModuleType("flash_attn")
    stub.flash_attn_varlen_func = _flash_attn_varlen_stub
    saved = sys.modules.get("flash_attn")
    sys.modules["flash_attn"] = stub
    try:
        ace_mod = pytest.importorskip("scepter.modules.model.backbone.ace.ace")
        layers = pytest.importorskip("scepter.modules.model.backbone.ace.layers")
        from scepter.modules.utils.config import Config
    finally:
        if saved is None:
            sys.modules.pop("flash_attn", None)
        else:
            sys.modules["flash_attn"] = saved
    # scepter casts q/k/v to fp16 before flash-attn unless told a dtype: ask for fp32 to compare in fp32
    orig = layers.MultiHeadAttention.flash_attn
    layers.MultiHeadAttention.flash_attn = lambda self, x, context=None, **kw: orig(
        self, x, context=context, **{**kw, "dtype": torch.float32})
    yield ace_mod.ACE, Config
    layers.MultiHeadAttention.flash_attn = orig


CONFIG = {"PATCH_SIZE": 2, "IN_CHANNELS": 4, "HIDDEN_SIZE": 60, "DEPTH": 2, "NUM_HEADS": 3, "MLP_RATIO": 2.0,
          "PRED_SIGMA": True, "Y_CHANNELS": 20, "MAX_SEQ_LEN": 64, "QK_NORM": True,
          "ATTENTION_BACKEND": "flash_attn"}


def _inputs(C=4, Y=20, Lpad=9):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    shapes = [(6, 10), (4, 8)]  # target latents (h, w): non-square, different per sample
    lmax = max(h * w for h, w in shapes)
    x = torch.zeros(2, C, lmax)
    for b, (h, w) in enumerate(shapes):
        x[b, :, : h * w] = r(C, h * w)
    x_mask = [None, (r(1, 1, 4, 8) > 0).float()]
    edit = [[r(1, C, 8, 4), r(1, C, 6, 6)], [r(1, C, 4, 10)]]
    edit_mask = [[(r(1, 1, 8, 4) > 0).float(), None], [None]]
    lens = [[5, 9, 3], [7, 2]]
    crossattn = [[r(Lpad, Y) for _ in ls] for ls in lens]
    mask = [[(torch.arange(Lpad) < n).long() for n in ls] for ls in lens]
    cond = {"x_shapes": shapes, "x_mask": x_mask, "edit": edit, "edit_mask": edit_mask, "crossattn": crossattn}
    return x, torch.tensor([999, 421]), cond, mask, r(10, Y)


def _randomise(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():  # non-zero everywhere, incl. the zero-initialised outputs
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))


@pytest.mark.parametrize("with_indicators", [True, False])
def test_ace_matches_scepter(scepter_ace, with_indicators):
    ACE, Config = scepter_ace
    ref = ACE(Config(cfg_dict=dict(CONFIG), load=False), logger=None).eval()
    _randomise(ref)
    x, t, cond, mask, tpe = _inputs()
    tpe = tpe if with_indicators else None
    with torch.no_grad():
        want = ref(x, t, cond=cond, mask=mask, text_position_embeddings=tpe)
        ours = ace_from_scepter(CONFIG, ref.state_dict())
        got = ace_forward(ours, x, t, cond, mask, tpe)
    assert got.shape == want.shape == (2, 4, 60)
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 1e-5, f"max relative error {rel:.2e}"  # fp32 re-implementation: ~1e-7 expected
    assert got[1, :, 32:].abs().max() == 0  # padding past the smaller target stays zero
