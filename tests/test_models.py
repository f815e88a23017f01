"""Both model families on their tiny presets: packing invariances, isolation, gradients, key layouts."""
import pytest
import torch

from omniace.engine import build_model, get_config
from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack
from omniace.engine.weights import load_into, remap_ace_keys

from helpers import randomise

ACE = get_config("ace-tiny", in_channels=3, y_channels=12)
SD3 = get_config("sd3-tiny-editnet", in_channels=3, out_channels=3, joint_attention_dim=12, pooled_projection_dim=8)


def ace_sample(hw, conds, texts, seed):
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    units = [ConditionUnit("", [ImageInput(r(3, *c), (r(*c) > 0).float())], text=r(n, 12))
             for c, n in zip(conds, texts[1:])]
    units.append(ConditionUnit("", [], text=r(texts[0], 12)))
    return LCUSample(units, ImageInput(r(3, h, w)))


def sd3_sample(hw, cond, text_len, seed):
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    images = [ImageInput(r(3, *cond))] if cond else []
    return LCUSample([ConditionUnit("", images, text=r(text_len, 12), pooled=r(8))], ImageInput(r(3, h, w)))


def run(model, samples, t, with_mask):
    b = pack(samples, 2, with_mask=with_mask)
    return b, model(b, b.target_tokens(), t)


@pytest.fixture(scope="module")
def ace():
    return randomise(build_model(ACE), 1).eval()


@pytest.fixture(scope="module")
def sd3():
    return randomise(build_model(SD3), 2, std=0.1).eval()


ACE_SAMPLES = [((6, 10), [(4, 8), (10, 2)], [5, 3, 9], 11), ((2, 14), [], [7], 12), ((8, 4), [(6, 6)], [1, 4], 13)]
SD3_SAMPLES = [((6, 10), (6, 10), 5, 21), ((4, 2), None, 3, 22), ((2, 8), (8, 2), 7, 23)]


@torch.no_grad()
@pytest.mark.parametrize("family", ["ace", "sd3"])
def test_packed_batch_equals_each_sample_alone(family, ace, sd3):
    model, make, specs, mask = (ace, ace_sample, ACE_SAMPLES, True) if family == "ace" else \
        (sd3, sd3_sample, SD3_SAMPLES, False)
    samples = [make(*a) for a in specs]
    t = torch.tensor([999.0, 10.0, 500.0])
    batch, out = run(model, samples, t, mask)
    cu = batch.cu_seqlens_target()
    for i, s in enumerate(samples):
        _, alone = run(model, [s], t[i : i + 1], mask)
        assert (out[cu[i] : cu[i + 1]] - alone).abs().max() < 1e-5 * alone.abs().max()


@torch.no_grad()
def test_changing_one_sample_never_changes_another(ace, sd3):
    for model, make, specs, mask in ((ace, ace_sample, ACE_SAMPLES, True), (sd3, sd3_sample, SD3_SAMPLES, False)):
        t = torch.tensor([700.0, 200.0, 50.0])
        a = [make(*s) for s in specs]
        b = [make(*specs[0][:-1], 99)] + a[1:]  # sample 0 redrawn entirely
        ba, oa = run(model, a, t, mask)
        _, ob = run(model, b, t, mask)
        n0 = ba.cu_seqlens_target()[1]
        assert not torch.allclose(oa[:n0], ob[:n0])
        assert torch.equal(oa[n0:], ob[n0:])


@torch.no_grad()
def test_unit_text_reaches_only_its_own_frames_in_cross_attention(ace):
    captured = []
    hook = ace.blocks[0].cross_attn.o.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    try:
        s = ace_sample(*ACE_SAMPLES[0])
        run(ace, [s], torch.tensor([300.0]), True)
        s.units[0].text = s.units[0].text + 1.0  # change unit 0 (owns condition frame 1) only
        batch, _ = run(ace, [s], torch.tensor([300.0]), True)
    finally:
        hook.remove()
    cu = batch.cu_seqlens_frame.tolist()
    diff = (captured[0] - captured[1]).abs().amax(dim=1)
    assert diff[cu[1] : cu[2]].min() > 0  # frame 1 (unit 0's image) sees the change
    assert diff[: cu[1]].max() == 0 and diff[cu[2] :].max() == 0  # the target and frame 2 do not


def test_forward_backward_both_families(ace, sd3):
    for model, make, specs, mask in ((ace, ace_sample, ACE_SAMPLES, True), (sd3, sd3_sample, SD3_SAMPLES, False)):
        model.zero_grad()
        b = pack([make(*s) for s in specs], 2, with_mask=mask)
        x = b.target_tokens().requires_grad_(True)
        out = model(b, x, torch.tensor([800.0, 100.0, 3.0]))
        (out.square().mean()).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        # unused by design: ACE's norm_k (the released model norms k with norm_q); the text queries of the
        # last, context-pre-only SD3 block (its text output is discarded)
        last = f"blocks.{len(model.transformer_blocks) - 1}.attn.add_q_proj" if model is sd3 else None
        dead = [n for n in dead if "norm_k" not in n and (last is None or last not in n)]
        assert not dead, dead
    model.zero_grad()


def test_sd3_checks_its_inputs(sd3):
    two = sd3_sample((6, 10), (6, 10), 5, 1)
    two.units[0].images.append(ImageInput(torch.randn(3, 2, 2)))
    b = pack([two], 2, with_mask=False)
    with pytest.raises(ValueError, match="sample 0: has 2 condition images; this model takes at most 1"):
        sd3(b, b.target_tokens(), torch.tensor([1.0]))
    b = pack([sd3_sample((6, 10), None, 5, 1)], 2, with_mask=False)
    with pytest.raises(ValueError, match=r"t must be \[1\]"):
        sd3(b, b.target_tokens(), torch.tensor([1.0, 2.0]))


@torch.no_grad()
def test_editnet_control_scale_gates_the_condition(sd3):
    s = sd3_sample((6, 10), (6, 10), 5, 3)
    b = pack([s], 2, with_mask=False)
    t = torch.tensor([500.0])
    base = sd3(b, b.target_tokens(), t, control_scale=0.0)
    on = sd3(b, b.target_tokens(), t, control_scale=1.0)
    s.units[0].images[0].latent += 1.0
    b2 = pack([s], 2, with_mask=False)
    assert torch.equal(base, sd3(b2, b2.target_tokens(), t, control_scale=0.0))  # gate 0: no condition effect
    assert not torch.allclose(on, sd3(b2, b2.target_tokens(), t, control_scale=1.0))


def _ace_released_layout(depth=28, d=1152, y=4096, cin=5, p=2, out=8):
    """The released ACE-0.6B key layout with shapes (from the checkpoint's key list, ACE_NOTES §10)."""
    keys = {"x_embedder.proj.weight": (d, cin, p, p), "x_embedder.proj.bias": (d,),
            "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
            "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
            "t_block.1.weight": (6 * d, d), "t_block.1.bias": (6 * d,),
            "y_embedder.fc1.weight": (d, y), "y_embedder.fc1.bias": (d,),
            "y_embedder.fc2.weight": (d, d), "y_embedder.fc2.bias": (d,),
            "final_layer.scale_shift_table": (2, d), "final_layer.linear.weight": (p * p * out, d),
            "final_layer.linear.bias": (p * p * out,), "text_position_embeddings.pos": (10, y)}
    for i in range(depth):
        for a in ("attn", "cross_attn"):
            for n in "qkvo":
                keys[f"blocks.{i}.{a}.{n}.weight"] = (d, d)
                keys[f"blocks.{i}.{a}.{n}.bias"] = (d,)
            keys[f"blocks.{i}.{a}.norm_q.weight"] = (d,)
            keys[f"blocks.{i}.{a}.norm_k.weight"] = (d,)
        keys[f"blocks.{i}.mlp.fc1.weight"] = (4 * d, d)
        keys[f"blocks.{i}.mlp.fc1.bias"] = (4 * d,)
        keys[f"blocks.{i}.mlp.fc2.weight"] = (d, 4 * d)
        keys[f"blocks.{i}.mlp.fc2.bias"] = (d,)
        keys[f"blocks.{i}.scale_shift_table"] = (6, d)
    return keys


def test_released_ace_layout_loads_into_ace_0p6b_512():
    with torch.device("meta"):
        model = build_model("ace-0.6b-512")
        sd = {k: torch.empty(s) for k, s in _ace_released_layout().items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in sd.items()}  # no missing, no unexpected, same shapes
    load_into(model, sd)
    assert model.cfg.norm_q_for_k and model.cfg.axes == (24, 24, 24) and model.cfg.head_dim == 72


def test_pixart_style_keys_are_remapped():
    small = _ace_released_layout(depth=1, d=8, y=6, cin=4)
    sd = {k: torch.randn(s) for k, s in small.items()}
    legacy = {}
    for k, v in sd.items():  # fold back into PixArt's fused / renamed keys
        if ".attn.q." in k:
            legacy[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat(
                [v, sd[k.replace(".q.", ".k.")], sd[k.replace(".q.", ".v.")]])
        elif ".cross_attn.k." in k:
            legacy[k.replace(".cross_attn.k.", ".cross_attn.kv_linear.")] = torch.cat([v, sd[k.replace(".k.", ".v.")]])
        elif ".cross_attn.q." in k:
            legacy[k.replace(".cross_attn.q.", ".cross_attn.q_linear.")] = v
        elif ".o." in k:
            legacy[k.replace(".o.", ".proj.")] = v
        elif k.startswith("y_embedder."):
            legacy[k.replace("y_embedder.", "y_embedder.y_proj.")] = v
        elif not any(x in k for x in (".attn.k.", ".attn.v.", ".cross_attn.v.")):
            legacy[k] = v
    model = build_model(get_config("ace-0.6b-512", depth=1, hidden_size=8, num_heads=2, y_channels=6))
    load_into(model, remap_ace_keys(legacy, x_embed_in_channels=5))
    w = model.x_embedder.proj.weight
    assert torch.equal(w[:, :4], sd["x_embedder.proj.weight"]) and w[:, 4].abs().max() == 0  # mask channel: 0
    assert torch.equal(model.blocks[0].attn.k.weight, sd["blocks.0.attn.k.weight"])
    assert torch.equal(model.blocks[0].cross_attn.v.bias, sd["blocks.0.cross_attn.v.bias"])


@pytest.mark.parametrize("variant", ["editnet", "controlnet", "concat"])
def test_conditioning_variants_start_as_the_base_and_then_use_the_source(variant):
    """OmniEdit table 7's three ways to condition one base: each starts as exactly the base model (zero init),
    and once its new weights move, the source image changes the output; ControlNet-style leaves text alone."""
    base_cfg = get_config("sd3-tiny-editnet", in_channels=3, out_channels=3, joint_attention_dim=12,
                          pooled_projection_dim=8, editnet=False)
    overrides = {"editnet": dict(editnet=True), "controlnet": dict(editnet=True, control="controlnet"),
                 "concat": dict(editnet=False, concat_condition=True)}[variant]
    base = randomise(build_model(base_cfg), 4, std=0.1).eval()
    model = build_model(get_config("sd3-tiny-editnet", in_channels=3, out_channels=3, joint_attention_dim=12,
                                   pooled_projection_dim=8, **overrides)).eval()
    sd = base.state_dict()
    if variant == "concat":  # the trainer's widening: zero weights for the source channels
        from omniace.train.trainer import widen_patch_embedding
        sd = widen_patch_embedding(sd, model)
    load_into(model, sd, allow_missing=tuple(k for k in model.state_dict() if k.startswith("editnet.")))
    if model.editnet is not None:
        model.editnet.init_from_base(model.transformer_blocks)
        assert len(model.editnet.txt_inject) == (0 if variant == "controlnet" else 1)
    s = sd3_sample((6, 10), (6, 10), 5, 3)
    b = pack([s], 2, with_mask=False)
    t = torch.tensor([500.0])
    with torch.no_grad():
        b0 = pack([LCUSample([ConditionUnit("", [], s.units[0].text, s.units[0].pooled)], s.target)], 2,
                  with_mask=False)
        torch.testing.assert_close(model(b, b.target_tokens(), t), base(b0, b0.target_tokens(), t),
                                   rtol=1e-5, atol=1e-5)
        randomise(model.editnet if model.editnet is not None else model.pos_embed, 5, std=0.1)
        out = model(b, b.target_tokens(), t)
        s.units[0].images[0].latent += 1.0
        b2 = pack([s], 2, with_mask=False)
        assert not torch.allclose(out, model(b2, b2.target_tokens(), t))
    if variant != "editnet":  # these add the source token for token: the sizes must agree
        bad = pack([sd3_sample((6, 10), (8, 2), 5, 3)], 2, with_mask=False)
        with pytest.raises(ValueError, match="condition grid 4x1 differs from the target's 3x5"):
            model(bad, bad.target_tokens(), t)
