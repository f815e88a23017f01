"""Text encoders: a small built-in byte-level encoder for the tiny default, T5 from a local folder.

An encoder maps instructions to per-instruction token states ``[L_i, Y]`` (only valid rows) and, for
the SD3 family, a pooled vector ``[P]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from omniace import require


@dataclass
class EncodedText:
    tokens: Tensor  # [L, Y]
    pooled: Tensor | None = None  # [P]


class TinyTextEncoder(nn.Module):
    """Byte-level tokenizer + one transformer layer; weights drawn from a fixed seed (reproducible)."""

    PAD, EOS, OFFSET = 0, 1, 2

    def __init__(self, dim: int = 32, pooled_dim: int | None = None, max_len: int = 32, seed: int = 1234):
        super().__init__()
        self.dim, self.max_len, self.pooled_dim = dim, max_len, pooled_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(256 + self.OFFSET, dim)
            self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.1)
            self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0,
                                                    batch_first=True, norm_first=True)
            self.norm = nn.LayerNorm(dim)
            self.pool = nn.Linear(dim, pooled_dim) if pooled_dim else None
        self.eval()

    def tokenize(self, text: str) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")][: self.max_len - 1]
        return ids + [self.EOS]

    @torch.no_grad()
    def forward(self, texts: list[str]) -> list[EncodedText]:
        out = []
        for text in texts:
            ids = torch.tensor(self.tokenize(text))[None]
            h = self.embed(ids) + self.pos[: ids.shape[1]]
            h = self.norm(self.layer(h))[0]
            pooled = self.pool(h.mean(0)) if self.pool is not None else None
            out.append(EncodedText(h, pooled))
        return out

    encode = forward


class T5TextEncoder:
    """T5 encoder from a local folder (``transformers``), ACE-style: 120 tokens, valid rows only."""

    def __init__(self, path: str | Path, max_len: int = 120, device: str = "cpu", dtype=torch.bfloat16):
        transformers = require("transformers", "dev", "T5TextEncoder (pip install transformers sentencepiece)")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = transformers.T5EncoderModel.from_pretrained(str(path), local_files_only=True,
                                                                 torch_dtype=dtype).to(device).eval()
        self.max_len, self.device = max_len, device
        self.dim = self.model.config.d_model
        self.pooled_dim = None

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[EncodedText]:
        tok = self.tokenizer(texts, max_length=self.max_len, padding="max_length", truncation=True,
                             return_tensors="pt").to(self.device)
        states = self.model(**tok).last_hidden_state.float()
        return [EncodedText(states[i, : int(tok.attention_mask[i].sum())]) for i in range(len(texts))]


def indicator_table(encoder, n: int = 10) -> Tensor:
    """ACE's image-indicator table: the encoder state at token 0 of ``{image}``, ``{image1}``, ..."""
    names = ["{image}"] + [f"{{image{i}}}" for i in range(1, n)]
    return torch.stack([e.tokens[0] for e in encoder.encode(names)])
