"""Diffusion training objectives on packed target tokens, with a per-sample importance weight.

Both families see only the target tokens noised (condition frames stay clean in the batch) and take the
loss on those tokens only:
- ``eps`` (ACE): DDPM linear betas 1e-4..0.02 over 1000 steps, ``t ~ U{0..999}``,
  ``x_t = alpha_t x0 + sigma_t eps``, the model predicts ``eps``; the schedule is the DDIM sampler's.
- ``x0``: the same noising, the model predicts the clean ``x0`` (the tiny pixel-space defaults).
- ``flow`` (SD3): rectified flow with logit-normal ``sigma`` (SD3's default, mean 0, std 1),
  ``x_t = (1 - sigma) x0 + sigma n``, the model predicts ``n - x0`` at ``t = 1000 sigma``.

``timestep_sampling`` picks how the noise level is drawn: ``auto`` is each family's own (uniform ``t`` for the
DDPM objectives, logit-normal for flow); ``uniform`` and ``logit_normal`` (SD3 sec. 3.1: ``u = sigmoid(z)``,
``z ~ N(logit_mean, logit_std)``; DDPM ``t = floor(1000 u)``, flow ``sigma = u``) apply to either. A mean below 0
spends more of the training on the middle noise levels (DDPM t ~ 100-400), where an edit's shape is decided
(docs/default_model.md, the from-target table). ``uniform_mix`` takes that fraction of the logit-normal draws
uniformly instead, so the pure-noise end a sampler starts from stays trained (a logit-normal density alone
starves it: run F in docs/default_model.md).

A self-conditioning model (``ACEConfig.self_condition``, Analog Bits: Chen et al., 2022, algorithm 1) trains half
its steps on its own x0 estimate: a first forward without gradient, fed back as ``x0_prev`` (:func:`predict`);
which steps is drawn from (seed, step) alone (:func:`self_condition_step`), so every rank of a sharded model
runs the same forwards and a resumed run draws the same.

Each sample's loss is the mean squared error over its own target tokens; samples of every size count
equally. The batch loss is ``sum_b lambda_b loss_b / N`` with N the number of samples in the global
batch (all ranks), OmniEdit's ``E[lambda ||.||^2]``: a sample with lambda = 0 adds exactly nothing.
"""
from __future__ import annotations

import math
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


TIMESTEP_SAMPLINGS = ("auto", "uniform", "logit_normal")


class Objective:
    """Draws the noise level and noise for a batch and scores a prediction, per sample.

    Raises ValueError for an unknown ``prediction`` or ``timestep_sampling``, a ``logit_std`` that is not a
    finite number > 0, or a ``uniform_mix`` outside [0, 1]."""

    def __init__(self, prediction: str, timestep_sampling: str = "auto", logit_mean: float = 0.0,
                 logit_std: float = 1.0, uniform_mix: float = 0.0):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; expected one of {TIMESTEP_SAMPLINGS}")
        if not (math.isfinite(logit_mean) and math.isfinite(logit_std) and logit_std > 0):
            raise ValueError(f"logit_mean {logit_mean} must be finite and logit_std {logit_std} finite and > 0")
        if not 0.0 <= uniform_mix <= 1.0:  # also refuses NaN
            raise ValueError(f"uniform_mix {uniform_mix} must be a fraction in [0, 1]")
        self.prediction = prediction
        if timestep_sampling == "auto":
            timestep_sampling = "logit_normal" if prediction == "flow" else "uniform"
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        self.uniform_mix = uniform_mix
        sigma, alpha = DDIMSampler().schedule()
        self.sigma, self.alpha = sigma.float(), alpha.float()

    def draw_u(self, num_samples: int, gen: torch.Generator, device: torch.device) -> Tensor:
        """``[B]`` noise levels as fractions in [0, 1) (fp32): uniform, or the logistic of a normal draw (of
        which a ``uniform_mix`` fraction, chosen per sample, is replaced by a uniform draw)."""
        if self.timestep_sampling == "uniform":
            return torch.rand(num_samples, generator=gen, device=device)
        z = torch.randn(num_samples, generator=gen, device=device)
        u = torch.sigmoid(z * self.logit_std + self.logit_mean)
        if self.uniform_mix == 0:  # no further draws: a run without the mixture keeps its random stream
            return u
        flat = torch.rand(num_samples, generator=gen, device=device)
        pick = torch.rand(num_samples, generator=gen, device=device) < self.uniform_mix
        return torch.where(pick, flat, u)

    def noise(self, x0: Tensor, sample_of: Tensor, num_samples: int, gen: torch.Generator) -> NoisedBatch:
        """``x0 [L_tgt, C*p*p]`` clean target tokens; ``sample_of [L_tgt]`` the sample of each token."""
        dev = x0.device
        noise = torch.randn(x0.shape, generator=gen, device=dev, dtype=torch.float32)
        x0 = x0.float()
        steps = len(self.sigma)
        if self.prediction in ("eps", "x0"):
            if self.timestep_sampling == "uniform":  # ACE's draw, kept bit-for-bit (runs resume across versions)
                t = torch.randint(0, steps, (num_samples,), generator=gen, device=dev)
            else:
                t = (self.draw_u(num_samples, gen, dev) * steps).long().clamp_(0, steps - 1)
            a = self.alpha.to(dev)[t][sample_of, None]
            s = self.sigma.to(dev)[t][sample_of, None]
            return NoisedBatch(a * x0 + s * noise, t, noise if self.prediction == "eps" else x0)
        sig = self.draw_u(num_samples, gen, dev)
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


# the share of training steps that run self-conditioning (Analog Bits: 0.5)
SELF_CONDITION_RATE = 0.5


def self_condition_step(seed: int, step: int, rate: float = SELF_CONDITION_RATE) -> bool:
    """Whether training step ``step`` of a run seeded ``seed`` feeds a self-conditioning model its own estimate:
    true for ``rate`` of the steps, a function of (seed, step) alone. Not of the rank: the extra forward gathers
    a sharded model's weights collectively, so every rank must run it or none. Analog Bits draws it per sample;
    per step, a step without it costs no extra forward."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1013 + 1)
    return bool(torch.rand((), generator=g) < rate)


def predict(model: torch.nn.Module, batch: PackedLCU, x_t: Tensor, t: Tensor, self_condition: bool = False) -> Tensor:
    """The prediction the loss is taken on, ``[L_tgt, C*p*p]``. With ``self_condition`` (the model's
    ``cfg.self_condition``, on a step :func:`self_condition_step` picks): the model's x0 estimate from a first
    forward without gradient, passed back as ``x0_prev`` (Analog Bits, algorithm 1: the gradient does not flow
    through the first estimate); otherwise one forward, which reads zeros for it."""
    if not self_condition:
        return model(batch, x_t, t)
    with torch.no_grad():
        x0_prev = model(batch, x_t, t).detach()
    return model(batch, x_t, t, x0_prev=x0_prev)
