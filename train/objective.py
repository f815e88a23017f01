"""Diffusion training objectives on packed target tokens, with a per-sample importance weight.

Both families see only the target tokens noised (condition frames stay clean in the batch) and take the
loss on those tokens only:
- ``eps`` (ACE): DDPM linear betas 1e-4..0.02 over 1000 steps, ``t ~ U{0..999}``,
  ``x_t = alpha_t x0 + sigma_t eps``, the model predicts ``eps``; the schedule is the DDIM sampler's.
- ``x0``: the same noising, the model predicts the clean ``x0`` (the tiny pixel-space defaults).
- ``flow`` (SD3): rectified flow with logit-normal ``sigma`` (SD3's default, mean 0, std 1),
  ``x_t = (1 - sigma) x0 + sigma n``, the model predicts ``n - x0`` at ``t = 1000 sigma``.

Each sample's loss is the mean squared error over its own target tokens; samples of every size count
equally. The batch loss is ``sum_b lambda_b loss_b / N`` with N the number of samples in the global
batch (all ranks), OmniEdit's ``E[lambda ||.||^2]``: a sample with lambda = 0 adds exactly nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from omniace.engine.lcu import PackedLCU, gather_source
from omniace.engine.sampler import PREDICTIONS, DDIMSampler


@dataclass
class NoisedBatch:
    x_t: Tensor  # [L_tgt, C*p*p] noisy target tokens (the model input)
    t: Tensor  # [B] the model's timestep input
    target: Tensor  # [L_tgt, C*p*p] what the model should predict


class Objective:
    """Draws the noise level and noise for a batch and scores a prediction, per sample."""

    def __init__(self, prediction: str):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
        self.prediction = prediction
        sigma, alpha = DDIMSampler().schedule()
        self.sigma, self.alpha = sigma.float(), alpha.float()

    def noise(self, x0: Tensor, sample_of: Tensor, num_samples: int, gen: torch.Generator) -> NoisedBatch:
        """``x0 [L_tgt, C*p*p]`` clean target tokens; ``sample_of [L_tgt]`` the sample of each token."""
        dev = x0.device
        noise = torch.randn(x0.shape, generator=gen, device=dev, dtype=torch.float32)
        x0 = x0.float()
        if self.prediction in ("eps", "x0"):
            t = torch.randint(0, len(self.sigma), (num_samples,), generator=gen, device=dev)
            a = self.alpha.to(dev)[t][sample_of, None]
            s = self.sigma.to(dev)[t][sample_of, None]
            return NoisedBatch(a * x0 + s * noise, t, noise if self.prediction == "eps" else x0)
        sig = torch.sigmoid(torch.randn(num_samples, generator=gen, device=dev))
        s = sig[sample_of, None]
        return NoisedBatch((1 - s) * x0 + s * noise, sig * 1000.0, noise - x0)

    @staticmethod
    def per_sample(pred: Tensor, target: Tensor, sample_of: Tensor, num_samples: int,
                   weight: Tensor | None = None) -> Tensor:
        """Mean squared error of each sample over its own target tokens: ``[B]`` (fp32). ``weight``
        ``[L_tgt, C*p*p]`` (optional) scales each element's squared error (see :func:`edit_region_weight`)."""
        err = (pred.float() - target).pow(2)
        per_token = (err if weight is None else err * weight).mean(dim=1)
        sums = torch.zeros(num_samples, device=pred.device).index_add_(0, sample_of, per_token)
        counts = torch.zeros(num_samples, device=pred.device).index_add_(0, sample_of, torch.ones_like(per_token))
        return sums / counts


def edit_region_weight(batch: PackedLCU, edit_weight: float, threshold: float = 0.02) -> Tensor | None:
    """Per-element loss weights ``[L_tgt, C*p*p]``: ``1 + edit_weight`` where the clean target differs from the
    source image by more than ``threshold`` (latent units; [-1, 1] pixels for the pixel codec), 1 elsewhere and
    in samples with no target-sized source (``batch.source_index`` -1). None when ``edit_weight`` is 0.

    Why: a local edit changes a few percent of the pixels, so a plain mean squared error is mostly about copying
    the untouched rest. Caveat (measured, docs/default_model.md): the weight depends on the target, so where the
    model is unsure the optimum leans toward changing pixels; :func:`sample_weights` by task does not."""
    if edit_weight == 0:
        return None
    c = batch.latent_channels * batch.patch_size**2
    source, has = gather_source(batch.tokens.float(), batch.source_index, c)
    changed = ((batch.target_tokens().float() - source).abs() > threshold) & has
    return 1.0 + edit_weight * changed.float()


def sample_weights(importance: Tensor, tasks: list[str], task_weights: dict[str, float]) -> Tensor:
    """``[B]`` loss weight per sample: its importance weight times its task's weight (1 for a task not named).
    The task follows from the instruction, so the weight leaves the best prediction for an input unchanged."""
    if not task_weights:
        return importance
    scale = torch.tensor([task_weights.get(t, 1.0) for t in tasks], dtype=importance.dtype, device=importance.device)
    return importance * scale


def target_sample_index(batch: PackedLCU) -> Tensor:
    """The sample of each target token, in ``target_tokens()`` order."""
    return batch.sample_of_token.index_select(0, batch.target_index)


def weighted_loss(per_sample: Tensor, weights: Tensor, global_samples: Tensor | int, world: int = 1) -> Tensor:
    """This rank's share of ``sum_b lambda_b loss_b / N`` over the global batch of N samples.

    FSDP averages gradients over the ``world`` ranks, hence the factor: the update then follows the
    global weighted mean whatever the split of samples between ranks.
    """
    return (weights * per_sample).sum() * world / global_samples
