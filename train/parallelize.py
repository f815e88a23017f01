"""What trains, and how the model is sharded: freezing, activation checkpointing, FSDP2 ``fully_shard``.

The models stay plain modules; this file applies parallelism beside them (torchtitan's split). Every
transformer block (and every EditNet control block) is its own FSDP unit, the root takes the rest.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from omniace.engine.config import ACEConfig

TRAIN_MODES = ("full", "editnet")


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, in call order: ACE ``blocks``; SD3 control block i, then base block i."""
    if isinstance(model.cfg, ACEConfig):
        return list(model.blocks)
    if model.editnet is None:
        return list(model.transformer_blocks)
    return [b for pair in zip(model.editnet.blocks, model.transformer_blocks) for b in pair]


def set_trainable(model: nn.Module, mode: str) -> list[str]:
    """Freeze per ``mode`` and return the trainable parameter names.

    ``full``: every parameter. ``editnet``: OmniEdit's recipe, only the control branch (its block copies,
    the condition embedding and the zero-initialised injections) trains; the base stays frozen.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"train mode {mode!r}; expected one of {TRAIN_MODES}")
    if mode == "editnet" and getattr(model, "editnet", None) is None:
        raise ValueError("train mode 'editnet' needs an SD3 model built with editnet=True")
    unused = unused_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_((mode == "full" or name.startswith("editnet.")) and name not in unused)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def unused_parameters(model: nn.Module) -> set[str]:
    """Parameters kept for the checkpoint layout that no forward reads (they would get no gradient and no
    optimizer state): ACE's ``norm_k`` when keys are normalised with ``norm_q``, as the released model does."""
    if isinstance(model.cfg, ACEConfig) and model.cfg.norm_q_for_k:
        return {n for n, _ in model.named_parameters() if ".norm_k." in n}
    return set()


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward (the models checkpoint per block)."""
    model.gradient_checkpointing = True


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """``fully_shard`` every block, then the root. Parameters are all-gathered in ``param_dtype``;
    gradients are reduced in fp32 whatever the parameter dtype (bf16 reductions lose small updates)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = blocks_of(model)
    for i, block in enumerate(blocks):
        # the last block is needed again first in the backward: keep it gathered (torchtitan's choice)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
        if hasattr(block, "input_modulation"):
            # EditNet fuses each injection with the *next* block's input modulation, computed before that
            # block runs: the method must gather the block's parameters like its forward does
            register_fsdp_forward_method(block, "input_modulation")
    fully_shard(model, mesh=mesh, mp_policy=mp)
