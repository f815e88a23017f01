"""Samplers over packed target tokens: rectified-flow Euler (SD3) and DDIM eps-prediction (ACE).

Only the target tokens are denoised; condition frames stay clean inside the batch. Noise is drawn per
sample from its own seeded generator, so a sample's result does not depend on its batch neighbours.
Classifier-free guidance combines a conditional and an unconditional prediction, with guidance
rescale (Lin et al.) computed per sample over that sample's own tokens (no padding enters the std).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import PREDICTION_TYPES
from .lcu import patchify

# denoise(x [L_tgt, C*p*p], t [B]) -> prediction [L_tgt, C*p*p]; the pipeline folds CFG into it
DenoiseFn = Callable[[Tensor, Tensor], Tensor]
TIMESTEP_SPACINGS = ("trailing", "sigma")  # DDIMSampler.timestep_spacing


def check_int(value: object, name: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; otherwise ValueError naming ``name``, the value and
    the expected range (bools and floats are refused: ``steps=2.5`` is a mistake, not a request)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_finite(value: object, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite ``float`` in ``[minimum, maximum]``; otherwise ValueError naming ``name``.

    NaN or inf guidance would reach every latent and decode to a black image without any error.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        limits = " and ".join(f"{op} {v}" for op, v in ((">=", minimum), ("<=", maximum)) if v is not None)
        raise ValueError(f"{name} must be a finite number{' ' + limits if limits else ''}, got {value!r}")
    return float(value)


def check_guidance(guidance: float, rescale: float) -> None:
    """CFG scale: any finite number; guidance rescale (Lin et al.'s phi): a blend weight in [0, 1]."""
    check_finite(guidance, "guidance")
    check_finite(rescale, "rescale", 0.0, 1.0)


def check_latent(x: Tensor, sampler: object, step: int, steps: int) -> None:
    """Stop sampling at the first non-finite latent (one host sync per step), naming the step."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{type(sampler).__name__}: the latent is not finite (NaN or inf) after step "
                                 f"{step} of {steps}; the model or its inputs overflowed, sampling stopped")


def initial_noise(target_sizes: list[tuple[int, int]], patch_size: int, seed: int, channels: int) -> Tensor:
    """Packed target-token noise (CPU); sample b draws from ``torch.Generator().manual_seed(seed + b)``."""
    rows = []
    for b, (h, w) in enumerate(target_sizes):
        g = torch.Generator().manual_seed(seed + b)
        rows.append(patchify(torch.randn(channels, h, w, generator=g), patch_size))
    return torch.cat(rows)


def guide(cond: Tensor, uncond: Tensor, guidance: float, rescale: float, cu_host: list[int]) -> Tensor:
    """CFG ``u + g (c - u)``, then per-sample guidance rescale toward the conditional std.

    Raises ValueError for a non-finite ``guidance`` or a ``rescale`` outside [0, 1].
    """
    check_guidance(guidance, rescale)
    out = uncond + guidance * (cond - uncond)
    if rescale <= 0:
        return out
    parts = []
    for a, b in zip(cu_host[:-1], cu_host[1:]):
        c, o = cond[a:b], out[a:b]
        ratio = c.std() / (o.std() + 1e-12)
        parts.append(o * (rescale * ratio + 1 - rescale))
    return torch.cat(parts)


class StepSampler:
    """A sampler as ``steps`` updates: ``timestep(i, n)`` is what the model sees at step ``i``, ``update``
    the sampler's rule and :meth:`step` the checked update, so a server can interleave many requests' steps."""

    steps: int

    def timestep(self, i: int, n: int = 1) -> Tensor:
        raise NotImplementedError

    def update(self, i: int, x: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, i: int, x: Tensor, out: Tensor) -> Tensor:
        """``x`` after step ``i`` given the model output ``out``; FloatingPointError at a non-finite latent."""
        x = self.update(i, x, out)
        check_latent(x, self, i + 1, self.steps)
        return x

    def sample(self, denoise: DenoiseFn, x: Tensor, num_samples: int) -> Tensor:
        """Denoise ``x [L_tgt, C*p*p]`` over ``steps`` steps; FloatingPointError at a non-finite latent."""
        for i in range(self.steps):
            x = self.step(i, x, denoise(x, self.timestep(i, num_samples).to(x.device)))
        return x


@dataclass
class DDIMSampler(StepSampler):
    """ACE's sampler: linear betas 1e-4..0.02 over 1000 steps, trailing spacing, eta 0.

    ``prediction="eps"`` (ACE) or ``"x0"``: the model predicts the clean latent, which suits tiny
    pixel-space models: an eps error is amplified by sigma/alpha (156x at t = 999) into the clean estimate.

    ``timestep_spacing``: ``"trailing"`` (ACE's, diffusers' name: every ``1000 / steps``-th step counted down
    from 999) or ``"sigma"``: the training steps nearest to noise levels ``sigma_t = sqrt(1 - alphas_cumprod_t)``
    evenly spaced from ``sigma_999`` to ``sigma_0``. With linear betas, trailing spends half its steps where
    ``sigma > 0.96`` and the input is nearly pure noise; "sigma" calls the model once there, then at the noise
    levels where the image takes shape (10 steps: 999, 391, 301, ..., 33, 0). ValueError when it would repeat a
    training step (above 271 steps of 1000: :meth:`max_distinct_steps`).
    """

    steps: int = 20
    num_train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"
    timestep_spacing: str = "trailing"

    def __post_init__(self) -> None:
        check_int(self.num_train_steps, "num_train_steps", 1)
        # more steps than training steps would repeat timesteps
        check_int(self.steps, "steps", 1, self.num_train_steps)
        if self.prediction not in ("eps", "x0"):
            raise ValueError(f"DDIMSampler prediction {self.prediction!r}; expected 'eps' or 'x0'")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")
        self._sigma, self._alpha = self.schedule()
        self._ts = self.timesteps().tolist()
        if len(set(self._ts)) < self.steps:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} with steps={self.steps} repeats training "
                             f"steps ({len(set(self._ts))} distinct of {self.num_train_steps}); use at most "
                             f"{self.max_distinct_steps()} steps, or the 'trailing' spacing")

    def max_distinct_steps(self) -> int:
        """The most steps at which this spacing gives distinct training steps (a bisection: for "sigma" on
        ACE's schedule, 271; for "trailing", ``num_train_steps``)."""
        lo, hi = 1, self.num_train_steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            distinct = len(set(self._spaced(mid).tolist())) == mid
            lo, hi = (mid, hi) if distinct else (lo, mid - 1)
        return lo

    def schedule(self) -> tuple[Tensor, Tensor]:
        """(sigma, alpha) per training step, with sigma² + alpha² = 1 (alpha = sqrt(alphas_cumprod))."""
        # on the CPU whatever the default device: a model built under ``torch.device("meta")`` reads it too
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_train_steps, dtype=torch.float32, device="cpu")
        acp = torch.cumprod(1 - betas.double(), dim=0)
        return (1 - acp).sqrt(), acp.sqrt()

    def timesteps(self) -> Tensor:
        """The model's timestep at each step, ``[steps]`` int64, from 999 down (``timestep_spacing``)."""
        return self._spaced(self.steps)

    def _spaced(self, steps: int) -> Tensor:
        n = self.num_train_steps
        if self.timestep_spacing == "sigma":
            sigma = self._sigma  # set in __post_init__ before any spacing is computed
            levels = torch.linspace(float(sigma[-1]), float(sigma[0]), steps, dtype=torch.float64, device="cpu")
            return (sigma[None, :] - levels[:, None]).abs().argmin(dim=1)
        # [:steps]: a float step can leave one more element, just above -1, for 62 step counts (61, 103, ...)
        return torch.arange(n - 1, -1, -n / steps, device="cpu")[:steps].clamp(0, n - 1).round().long()

    def timestep(self, i: int, n: int = 1) -> Tensor:
        """The model's timestep at step ``i`` for ``n`` samples: ``[n]`` int64 (CPU)."""
        return torch.full((n,), self._ts[i], dtype=torch.long)

    def update(self, i: int, x: Tensor, out: Tensor) -> Tensor:
        """One DDIM (eta 0) update of ``x`` given the model output ``out`` at step ``i``."""
        t = self._ts[i]
        s, a = float(self._sigma[t]), float(self._alpha[t])
        x0 = out if self.prediction == "x0" else (x - s * out) / a
        s_next = float(self._sigma[self._ts[i + 1]]) if i + 1 < len(self._ts) else 0.0
        eps_hat = (x - (1 - s * s) ** 0.5 * x0) / s
        return (1 - s_next * s_next) ** 0.5 * x0 + s_next * eps_hat


@dataclass
class FlowEulerSampler(StepSampler):
    """Rectified-flow Euler with SD3's timestep shift ``s σ / (1 + (s - 1) σ)``; the model predicts
    the velocity ``noise - x0`` at ``t = 1000 σ``."""

    steps: int = 28
    shift: float = 3.0

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 1)
        if check_finite(self.shift, "shift") <= 0:  # shift 0 makes every sigma 0: pure noise out
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")
        self._sig = self.sigmas().tolist()

    def sigmas(self) -> Tensor:
        s = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def timestep(self, i: int, n: int = 1) -> Tensor:
        """The model's timestep ``1000 sigma_i`` at step ``i`` for ``n`` samples: ``[n]`` float32 (CPU)."""
        return torch.full((n,), self._sig[i] * 1000.0, dtype=torch.float32)

    def update(self, i: int, x: Tensor, v: Tensor) -> Tensor:
        """One Euler step of the flow ODE from sigma_i to sigma_{i+1} with velocity ``v``."""
        return x + (self._sig[i + 1] - self._sig[i]) * v


PREDICTIONS = PREDICTION_TYPES  # one list, with the model configs that name them


def make_sampler(prediction: str, steps: int, shift: float = 3.0,
                 timestep_spacing: str = "trailing") -> DDIMSampler | FlowEulerSampler:
    """The sampler for a model's prediction type; ValueError for a bad type, ``steps``, ``shift`` or
    ``timestep_spacing`` (a DDIM setting: the flow sampler takes only "trailing", its own spacing)."""
    if prediction in ("eps", "x0"):
        return DDIMSampler(steps=steps, prediction=prediction, timestep_spacing=timestep_spacing)
    if prediction == "flow":
        if timestep_spacing != "trailing":
            raise ValueError(f"timestep_spacing {timestep_spacing!r} is a DDIM setting; the flow sampler spaces "
                             f"its steps by its shift (use 'trailing')")
        return FlowEulerSampler(steps=steps, shift=shift)
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
