"""EditNet (OmniEdit §4, figure 4): a control branch with one copy of every base block.

Per block i the control copy runs joint attention over the condition-image tokens ``c``, the main
tokens ``h`` entering base block i and its own text stream, so it sees the main branch's intermediate
representation (unlike ControlNet, whose branch runs in parallel on fixed inputs). Its outputs at the
main-token positions and on the text stream go through zero-initialised linears and are added to the
base block's image and text outputs; each injection is fused with the next block's input LayerNorm and
adaLN modulation by ``editnet_inject``. The condition image enters through a zero-initialised patch
embedding (plus the base's positional table), so a fresh EditNet leaves the base model unchanged.

``cfg.control = "controlnet"`` builds the baseline of OmniEdit's table 7 instead: the branch starts
from the main input embedding plus the embedded condition (token for token), runs in parallel with
the base, and injects into the image stream only; the base's text stream is never updated.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

from omniace.kernels import editnet_inject

from .layers import PatchEmbed, run_block


class EditNet(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        cfg = base.cfg
        d, n = cfg.hidden_size, cfg.num_layers
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in base.transformer_blocks)
        self.cond_embed = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.control = cfg.control
        self.img_inject = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        # the last block has no text output; a ControlNet-style branch never updates the text stream
        n_txt = n - 1 if self.control == "editnet" else 0
        self.txt_inject = nn.ModuleList(nn.Linear(d, d) for _ in range(n_txt))
        self.zero_init()

    def zero_init(self) -> None:
        for lin in [self.cond_embed.proj, *self.img_inject, *self.txt_inject]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @torch.no_grad()
    def init_from_base(self, base_blocks: nn.ModuleList) -> None:
        """Copy every base block into its control twin (after loading base weights)."""
        for ctrl, blk in zip(self.blocks, base_blocks):
            ctrl.load_state_dict(blk.state_dict())

    def start(self, pos_embed, plan, e: Tensor, temb: Tensor, control_scale: float | Tensor,
              checkpointed: bool = False) -> "ControlRun":
        return ControlRun(self, pos_embed, plan, e, temb, control_scale, checkpointed)


class ControlRun:
    """State of one forward through the control branch (condition tokens, control text, gates).

    Reads only the tensors of the batch's ``SD3Plan`` (no host work), so it traces and exports."""

    def __init__(self, net: EditNet, pos_embed, plan, e: Tensor, temb: Tensor, control_scale: float | Tensor,
                 checkpointed: bool = False):
        dev, dtype = e.device, e.dtype
        self.net, self.temb, self.img, self.txt = net, temb, plan.img, plan.txt
        self.checkpointed = checkpointed
        self.ec = e
        n_samples = plan.pooled.shape[0]
        scale = torch.as_tensor(control_scale, dtype=dtype, device=dev).reshape(-1)
        self.gate = scale.expand(n_samples)[:, None].expand(-1, e.shape[1]).contiguous()
        c_lat = net.cond_embed.proj.weight[0].numel()
        if net.control == "controlnet":  # condition embedded onto the target's own tokens (diffusers' SD3 ControlNet)
            self.c = net.cond_embed(plan.tokens.index_select(0, plan.aligned_rows)[:, :c_lat].to(dtype))
            self.layout = plan.joint
            return
        self.c = net.cond_embed(plan.tokens.index_select(0, plan.cond_rows)[:, :c_lat].to(dtype))
        self.c = self.c + pos_embed.positions(plan.cond_pos_index).to(dtype)
        self.xlayout, self.xseg, self.jlayout = plan.ctrl_layout, plan.ctrl, plan.ctrl_joint

    def step(self, i: int, h: Tensor) -> None:
        if self.net.control == "controlnet":
            # a parallel branch: it sees the main tokens only at the input, then runs on its own
            x = h + self.c if i == 0 else self.hc
            self.hc, self.ec = run_block(self.net.blocks[i], self.checkpointed, x, self.ec, self.temb, self.img,
                                         self.txt, self.layout)
            return
        x = self.xlayout.join(self.c, h)
        x, ec = run_block(self.net.blocks[i], self.checkpointed, x, self.ec, self.temb, self.xseg, self.txt,
                          self.jlayout)
        self.c, self.hc = self.xlayout.split(x)
        self.ec_out = ec

    def inject(self, i: int, h: Tensor, e: Tensor | None, nxt) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        h, h_in = editnet_inject(h, self.net.img_inject[i](self.hc), nxt.img_shift, nxt.img_scale,
                                 self.gate, self.img.cu)
        if e is None or self.net.control == "controlnet":
            return h, h_in, e, None  # the next block norms the untouched text stream itself
        e, e_in = editnet_inject(e, self.net.txt_inject[i](self.ec_out), nxt.txt_shift, nxt.txt_scale,
                                 self.gate, self.txt.cu)
        self.ec = self.ec_out
        return h, h_in, e, e_in
