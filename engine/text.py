"""Text encoders: a small built-in byte-level encoder for the tiny default, T5 from a local folder.

An encoder maps instructions to per-instruction token states ``[L_i, Y]`` (only valid rows) and, for
the SD3 family, a pooled vector ``[P]``: ``encode(texts, truncate=True) -> list[EncodedText]``. Text past
the encoder's limit is cut with a :class:`TruncationWarning` naming the dropped tail, or refused with a
ValueError when ``truncate=False``: two instructions that differ only past the limit give the same image.
"""
from __future__ import annotations

import warnings
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


class TruncationWarning(UserWarning):
    """An instruction was longer than its text encoder keeps; the warning names the dropped tail."""


def overflow(text: str, dropped: str, length: str, truncate: bool) -> None:
    """Report an instruction cut at the encoder's limit: warn (``truncate``) or raise ValueError.

    ``length`` says how long the text is and what the encoder keeps, e.g. ``"80 UTF-8 bytes; ... keeps 63"``.
    """
    head = text if len(text) <= 40 else text[:37] + "..."
    if not truncate:
        raise ValueError(f"instruction {head!r} is {length}: it would drop {dropped!r}; shorten it "
                         f"(or allow truncation)")
    warnings.warn(f"instruction {head!r} is {length}: dropped {dropped!r}", TruncationWarning, stacklevel=3)


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

    def tokenize(self, text: str, truncate: bool = True) -> list[int]:
        """UTF-8 bytes (+ OFFSET) and EOS: at most ``max_len`` ids. Longer text keeps its first
        ``max_len - 1`` bytes (as the default was trained), with a warning, or ValueError if not ``truncate``."""
        data = text.encode("utf-8")
        keep = self.max_len - 1
        if len(data) > keep:
            # a character the limit cuts through counts as dropped (the model still sees its first bytes)
            kept_chars = len(data[:keep].decode("utf-8", errors="ignore"))
            overflow(text, text[kept_chars:], f"{len(data)} UTF-8 bytes; the byte-level text encoder keeps {keep}",
                     truncate)
        return [b + self.OFFSET for b in data[:keep]] + [self.EOS]

    @torch.no_grad()
    def forward(self, texts: list[str], truncate: bool = True) -> list[EncodedText]:
        """``texts`` -> per text ``tokens [L, dim]`` (L <= max_len) and, with ``pooled_dim``, ``pooled``."""
        out = []
        for text in texts:
            ids = torch.tensor(self.tokenize(text, truncate))[None]
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
    def encode(self, texts: list[str], truncate: bool = True) -> list[EncodedText]:
        """``texts`` -> per text ``tokens [L, d_model]`` float32, L <= max_len (EOS included)."""
        for text, ids in zip(texts, self.tokenizer(texts, truncation=False)["input_ids"]):
            if len(ids) > self.max_len:  # truncation keeps max_len - 1 tokens and the EOS
                dropped = self.tokenizer.decode(ids[self.max_len - 1:], skip_special_tokens=True)
                overflow(text, dropped, f"{len(ids)} T5 tokens; T5TextEncoder keeps {self.max_len}", truncate)
        tok = self.tokenizer(texts, max_length=self.max_len, padding="max_length", truncation=True,
                             return_tensors="pt").to(self.device)
        states = self.model(**tok).last_hidden_state.float()
        return [EncodedText(states[i, : int(tok.attention_mask[i].sum())]) for i in range(len(texts))]


def indicator_table(encoder, n: int = 10) -> Tensor:
    """ACE's image-indicator table: the encoder state at token 0 of ``{image}``, ``{image1}``, ..."""
    names = ["{image}"] + [f"{{image{i}}}" for i in range(1, n)]
    return torch.stack([e.tokens[0] for e in encoder.encode(names)])
