"""Samplers over packed target tokens: rectified-flow Euler (SD3) and DDIM eps-prediction (ACE).

Only the target tokens are denoised; condition frames stay clean inside the batch. Noise is drawn per
sample from its own seeded generator, so a sample's result does not depend on its batch neighbours.
Classifier-free guidance combines a conditional and an unconditional prediction, with guidance
rescale (Lin et al.) computed per sample over that sample's own tokens (no padding enters the std).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .lcu import patchify

# denoise(x [L_tgt, C*p*p], t [B]) -> prediction [L_tgt, C*p*p]; the pipeline folds CFG into it
DenoiseFn = Callable[[Tensor, Tensor], Tensor]


def initial_noise(target_sizes: list[tuple[int, int]], patch_size: int, seed: int, channels: int) -> Tensor:
    """Packed target-token noise (CPU); sample b draws from ``torch.Generator().manual_seed(seed + b)``."""
    rows = []
    for b, (h, w) in enumerate(target_sizes):
        g = torch.Generator().manual_seed(seed + b)
        rows.append(patchify(torch.randn(channels, h, w, generator=g), patch_size))
    return torch.cat(rows)


def guide(cond: Tensor, uncond: Tensor, guidance: float, rescale: float, cu_host: list[int]) -> Tensor:
    """CFG ``u + g (c - u)``, then per-sample guidance rescale toward the conditional std."""
    out = uncond + guidance * (cond - uncond)
    if rescale <= 0:
        return out
    parts = []
    for a, b in zip(cu_host[:-1], cu_host[1:]):
        c, o = cond[a:b], out[a:b]
        ratio = c.std() / (o.std() + 1e-12)
        parts.append(o * (rescale * ratio + 1 - rescale))
    return torch.cat(parts)


@dataclass
class DDIMSampler:
    """ACE's sampler: linear betas 1e-4..0.02 over 1000 steps, trailing spacing, eta 0.

    ``prediction="eps"`` (ACE) or ``"x0"``: the model predicts the clean latent, which suits tiny
    pixel-space models: an eps error is amplified by sigma/alpha (156x at t = 999) into the clean estimate.
    """

    steps: int = 20
    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"

    def schedule(self) -> tuple[Tensor, Tensor]:
        """(sigma, alpha) per training step, with sigma² + alpha² = 1 (alpha = sqrt(alphas_cumprod))."""
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_train_steps, dtype=torch.float32)
        acp = torch.cumprod(1 - betas.double(), dim=0)
        return (1 - acp).sqrt(), acp.sqrt()

    def timesteps(self) -> Tensor:
        n = self.num_train_steps
        return torch.arange(n - 1, -1, -n / self.steps).clamp(0, n - 1).round().long()

    def sample(self, denoise: DenoiseFn, x: Tensor, num_samples: int) -> Tensor:
        sigma, alpha = self.schedule()
        ts = self.timesteps()
        for i, t in enumerate(ts.tolist()):
            out = denoise(x, torch.full((num_samples,), t, dtype=torch.long, device=x.device))
            s, a = float(sigma[t]), float(alpha[t])
            x0 = out if self.prediction == "x0" else (x - s * out) / a
            s_next = float(sigma[int(ts[i + 1])]) if i + 1 < len(ts) else 0.0
            eps_hat = (x - (1 - s * s) ** 0.5 * x0) / s
            x = (1 - s_next * s_next) ** 0.5 * x0 + s_next * eps_hat
        return x


@dataclass
class FlowEulerSampler:
    """Rectified-flow Euler with SD3's timestep shift ``s σ / (1 + (s - 1) σ)``; the model predicts
    the velocity ``noise - x0`` at ``t = 1000 σ``."""

    steps: int = 28
    shift: float = 3.0

    def sigmas(self) -> Tensor:
        s = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sample(self, denoise: DenoiseFn, x: Tensor, num_samples: int) -> Tensor:
        sig = self.sigmas().tolist()
        for i in range(self.steps):
            t = torch.full((num_samples,), sig[i] * 1000.0, dtype=torch.float32, device=x.device)
            v = denoise(x, t)
            x = x + (sig[i + 1] - sig[i]) * v
        return x


PREDICTIONS = ("eps", "x0", "flow")


def make_sampler(prediction: str, steps: int, shift: float = 3.0) -> DDIMSampler | FlowEulerSampler:
    if prediction in ("eps", "x0"):
        return DDIMSampler(steps=steps, prediction=prediction)
    if prediction == "flow":
        return FlowEulerSampler(steps=steps, shift=shift)
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
