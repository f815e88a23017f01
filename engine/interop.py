"""Drop-in interop for users of the originals: scepter's ACE backbone and diffusers' SD3 transformer.

Both directions convert to and from the packed LCU batch, so the same engine and kernels run
underneath; the interop tests go through these functions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import ACEConfig, SD3Config
from .lcu import ConditionUnit, ImageInput, LCUSample, pack
from .weights import StateDict, ace_state_dict, load_into


# ----------------------------------------------------------------------------------------------- ACE
def ace_config_from_scepter(config: dict) -> ACEConfig:
    """Map scepter's ``ACE`` backbone keys (PATCH_SIZE, IN_CHANNELS, ...) onto :class:`ACEConfig`."""
    unsupported = {k: config[k] for k in ("WINDOW_BLOCK_INDEXES", "WINDOW_SIZE") if config.get(k)}
    if unsupported:
        raise ValueError(f"scepter ACE options not supported: {unsupported}")
    return ACEConfig(
        patch_size=int(config.get("PATCH_SIZE", 2)),
        in_channels=int(config.get("IN_CHANNELS", 4)),
        hidden_size=int(config.get("HIDDEN_SIZE", 1152)),
        depth=int(config.get("DEPTH", 28)),
        num_heads=int(config.get("NUM_HEADS", 16)),
        mlp_ratio=float(config.get("MLP_RATIO", 4.0)),
        pred_sigma=bool(config.get("PRED_SIGMA", True)),
        y_channels=int(config.get("Y_CHANNELS", 4096)),
        qk_norm=bool(config.get("QK_NORM", False)),
        norm_q_for_k=True,
    )


def ace_from_scepter(config: dict, state_dict: StateDict):
    """Build an :class:`~omniace.engine.ace.ACEModel` from a scepter config dict and its state dict."""
    from .ace import ACEModel

    cfg = ace_config_from_scepter(config)
    model = ACEModel(cfg)
    sd = ace_state_dict(state_dict, cfg.in_channels)
    load_into(model, sd, allow_missing=("text_position_embeddings.pos",))
    return model.eval()


def ace_forward(model, x: Tensor, t: Tensor, cond: dict, mask: list, text_position_embeddings: Tensor | None):
    """Exactly scepter's ``ACE.forward(x, t, cond, mask, text_position_embeddings)``.

    x ``[B, C, Lmax]`` packed target latents; ``cond`` has ``x_shapes``, ``x_mask``, ``edit``,
    ``edit_mask`` and ``crossattn`` (one text unit per frame: unit 0 for the target, unit j for
    condition image j-1); ``mask`` holds the per-unit prefix masks. Returns ``[B, C, Lmax]`` with zeros
    past each sample's ``h*w``.
    """
    if not isinstance(mask, list):
        raise TypeError(f"mask must be a list of per-unit prefix masks, got {type(mask).__name__}")
    cfg: ACEConfig = model.cfg
    samples = []
    for b in range(x.shape[0]):
        h, w = (int(v) for v in cond["x_shapes"][b])
        target = ImageInput(x[b, :, : h * w].reshape(-1, h, w), _mask2d(cond["x_mask"][b]))
        edits = (cond.get("edit") or [None] * x.shape[0])[b] or []
        edit_masks = (cond.get("edit_mask") or [None] * x.shape[0])[b] or [None] * len(edits)
        texts = [u[: int(m.flatten().sum())] for u, m in zip(cond["crossattn"][b], mask[b])]
        if len(texts) != len(edits) + 1:
            raise ValueError(f"sample {b}: {len(texts)} text units for {len(edits) + 1} frames; "
                             f"scepter pairs one unit with each frame")
        # unit j+1 goes with condition image j (a history unit each), unit 0 with the target
        units = [ConditionUnit("", [ImageInput(e[0], _mask2d(m))], text=texts[j + 1])
                 for j, (e, m) in enumerate(zip(edits, edit_masks))]
        units.append(ConditionUnit("", [], text=texts[0]))
        samples.append(LCUSample(units, target))
    batch = pack(samples, cfg.patch_size, codec_factor=cfg.codec_factor, with_mask=True, device=x.device)
    table = False if text_position_embeddings is None else text_position_embeddings
    out = model(batch, batch.target_tokens(), t, indicator_table=table)
    lmax = x.shape[-1]
    rows = [lat.flatten(1) for lat in batch.targets_from_tokens(out)]
    return torch.stack([torch.nn.functional.pad(r, (0, lmax - r.shape[1])) for r in rows]).to(x.dtype)


def _mask2d(m: Tensor | None) -> Tensor | None:
    return None if m is None else m.reshape(m.shape[-2], m.shape[-1])


# ----------------------------------------------------------------------------------------------- SD3
def sd3_config_from_diffusers(config: dict, editnet: bool = False, **overrides) -> SD3Config:
    """Map a diffusers ``SD3Transformer2DModel`` config dict onto :class:`SD3Config` (SD3, SD3.5 Medium's
    MMDiT-X ``dual_attention_layers``, SD3.5 Large's ``qk_norm``)."""
    keys = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
            "pos_embed_max_size", "qk_norm", "dual_attention_layers")
    kw = {k: config[k] for k in keys if k in config and config[k] is not None}
    kw.setdefault("out_channels", kw.get("in_channels", 16))
    return SD3Config(editnet=editnet, **{**kw, **overrides})


def sd3_from_diffusers(config: dict, state_dict: StateDict, editnet: bool = False, **overrides):
    """Build an :class:`~omniace.engine.sd3.SD3Model` holding a diffusers SD3 transformer's weights;
    ``overrides`` are :class:`SD3Config` fields the diffusers config does not hold (``codec_factor``).

    With ``editnet=True`` the control branch is added and initialised from the loaded base blocks
    (its zero-initialised injections leave the output unchanged until trained).
    """
    from .sd3 import SD3Model

    model = SD3Model(sd3_config_from_diffusers(config, editnet, **overrides))
    sd = dict(state_dict)
    if editnet:
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("editnet.")})
    load_into(model, sd)
    if model.editnet is not None:
        model.editnet.init_from_base(model.transformer_blocks)
    return model.eval()


def sd3_forward(model, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                timestep: Tensor) -> Tensor:
    """What diffusers' ``SD3Transformer2DModel(...).sample`` returns, computed by the packed engine.

    hidden_states ``[B, C, H, W]``; encoder_hidden_states ``[B, T, joint_attention_dim]``;
    pooled_projections ``[B, pooled_projection_dim]``; timestep ``[B]``. Returns ``[B, C_out, H, W]``.
    """
    cfg: SD3Config = model.cfg
    samples = [
        LCUSample([ConditionUnit("", [], text=encoder_hidden_states[b], pooled=pooled_projections[b])],
                  ImageInput(hidden_states[b]))
        for b in range(hidden_states.shape[0])
    ]
    batch = pack(samples, cfg.patch_size, codec_factor=cfg.codec_factor, with_mask=False,
                 device=hidden_states.device)
    timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(hidden_states.shape[0])
    out = model(batch, batch.target_tokens(), timestep)
    return torch.stack(batch.targets_from_tokens(out)).to(hidden_states.dtype)
