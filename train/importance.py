"""OmniEdit's importance weight of a training pair, from the judge's score columns.

Default: the paper's binary lambda = 1 if ``o_score >= 9`` else 0. ``mode="soft"`` gives a weight that
rises linearly from ``soft_floor`` to 1 at the threshold, for runs that want to keep near-misses. The
column, the threshold and the mode are configurable (``sc_score_1`` alone, say).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("binary", "soft", "none")


@dataclass(frozen=True)
class ImportanceConfig:
    column: str = "o_score"
    threshold: float = 9.0
    mode: str = "binary"  # binary | soft | none (every pair weighs 1: the unfiltered baseline)
    soft_floor: float = 5.0  # soft: weight 0 at or below this score

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"importance mode {self.mode!r}; expected one of {MODES}")
        if self.mode == "soft" and not self.soft_floor < self.threshold:
            raise ValueError(f"soft_floor {self.soft_floor} must be below threshold {self.threshold}")


def importance_weight(row: dict, cfg: ImportanceConfig) -> float:
    """lambda for one record, in [0, 1].

    Raises ``KeyError`` when the record has no value in the configured score column and ``ValueError`` when
    the value is not a finite number (NaN would otherwise read as "below the threshold": a silent lambda = 0).
    """
    if cfg.mode == "none":
        return 1.0
    if row.get(cfg.column) is None:
        raise KeyError(f"record {row.get('omni_edit_id')!r} has no {cfg.column!r} score for the importance weight")
    try:
        s = float(row[cfg.column])
    except (TypeError, ValueError):
        s = math.nan
    if not math.isfinite(s):
        raise ValueError(f"record {row.get('omni_edit_id')!r}: {cfg.column} {row[cfg.column]!r} is not a finite score")
    if cfg.mode == "binary":
        return 1.0 if s >= cfg.threshold else 0.0
    return min(1.0, max(0.0, (s - cfg.soft_floor) / (cfg.threshold - cfg.soft_floor)))
