"""Text encoders: small built-in byte-level and word-level encoders for the tiny presets and the default; T5 (ACE) and SD3's CLIP-L + CLIP-G
(+ T5) from local folders, with ``transformers``.

An encoder maps instructions to per-instruction token states ``[L_i, Y]`` (only valid rows) and, for
the SD3 family, a pooled vector ``[P]``: ``encode(texts, truncate=True) -> list[EncodedText]``. Text past
the encoder's limit is cut with a :class:`TruncationWarning` naming the dropped tail, or refused with a
ValueError when ``truncate=False``: two instructions that differ only past the limit give the same image.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from omniace import require

from .lcu import _INDICATOR, indicator_token


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


class WordTextEncoder:
    """Word-level encoder for the embedded default: each word (lowercase letters and digits, an ``{imageN}``
    indicator, or a punctuation mark) maps to a fixed random vector drawn from a seed its text hashes to,
    plus a fixed random position vector; an EOS vector closes the text. Nothing is trained and any word has a
    vector, so the model learns what ``red`` or ``circle`` mean at once, where a byte-level encoder leaves it
    to learn spelling first (measured: docs/default_model.md). ``encode(texts, truncate)`` as the others:
    per text ``tokens [L, dim]`` (L <= ``max_len``, fp32)."""

    WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
    EOS = "<eos>"

    def __init__(self, dim: int = 32, max_len: int = 64, seed: int = 1234, position_scale: float = 0.5):
        self.dim, self.max_len, self.seed = dim, max_len, seed
        self.pooled_dim = None  # no pooled vector (ACE reads none); the latent cache records the width
        g = torch.Generator().manual_seed(seed)
        self.pos = torch.randn(max_len, dim, generator=g) * position_scale
        self._vectors: dict[str, Tensor] = {}

    def words(self, text: str) -> list[str]:
        """Lowercase words and marks; an image indicator is one word, spelt as the packer reads it
        (case-sensitive, ``{image0}`` = ``{image}``, ``{image01}`` = ``{image1}``), so the model never sees an
        indicator vector for text that names no image (``{IMAGE9}``) or two vectors for one image."""
        out = []
        for k, part in enumerate(_INDICATOR.split(text)):  # text, an indicator's digits, text, ...
            out += self.WORD.findall(part.lower()) if k % 2 == 0 else [indicator_token(int(part or 0))]
        return out

    def vector(self, word: str) -> Tensor:
        """``[dim]`` fp32, unit variance per element; the same for a word in every process."""
        v = self._vectors.get(word)
        if v is None:
            digest = hashlib.blake2b(f"{self.seed}:{word}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            v = self._vectors[word] = torch.randn(self.dim, generator=g)
        return v

    def tokenize(self, text: str, truncate: bool = True) -> list[str]:
        """The words and EOS: at most ``max_len``. Longer text keeps its first ``max_len - 1`` words, with a
        :class:`TruncationWarning`, or ValueError if not ``truncate``."""
        words = self.words(text)
        keep = self.max_len - 1
        if len(words) > keep:
            overflow(text, " ".join(words[keep:]), f"{len(words)} words; the word-level text encoder keeps {keep}",
                     truncate)
        return words[:keep] + [self.EOS]

    def encode(self, texts: list[str], truncate: bool = True) -> list[EncodedText]:
        out = []
        for text in texts:
            words = self.tokenize(text, truncate)
            out.append(EncodedText(torch.stack([self.vector(w) for w in words]) + self.pos[: len(words)]))
        return out

    __call__ = encode


def check_length(tokenizer, texts: list[str], max_len: int, unit: str, encoder: str, truncate: bool) -> None:
    """Warn (``truncate``) or raise for each text whose token ids (special tokens included) exceed ``max_len``:
    "is N ``unit`` tokens; ``encoder`` keeps ``max_len``", naming the tail ``truncation=True`` would drop."""
    for text, ids in zip(texts, tokenizer(texts, truncation=False)["input_ids"]):
        if len(ids) > max_len:  # truncation keeps max_len - 1 tokens and the closing special token
            dropped = tokenizer.decode(ids[max_len - 1:], skip_special_tokens=True)
            overflow(text, dropped, f"{len(ids)} {unit} tokens; {encoder} keeps {max_len}", truncate)


def _local(transformers_cls, path: str | Path, what: str, **kw):
    """``from_pretrained`` of a local folder only; a missing folder is a FileNotFoundError naming ``what``."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what}: {str(path)!r} is not a folder")
    return transformers_cls.from_pretrained(str(path), local_files_only=True, **kw)


class T5TextEncoder:
    """T5 encoder from a local folder (``transformers``), ACE-style: 120 tokens, valid rows only.

    ``tokenizer``: the tokenizer's folder when it is not ``path`` itself."""

    def __init__(self, path: str | Path, max_len: int = 120, device: str = "cpu", dtype=torch.bfloat16,
                 tokenizer: str | Path | None = None):
        transformers = require("transformers", "dev", "T5TextEncoder (pip install transformers sentencepiece)")
        self.tokenizer = _local(transformers.AutoTokenizer, tokenizer or path, "T5 tokenizer")
        self.model = _local(transformers.T5EncoderModel, path, "T5 encoder", dtype=dtype).to(device).eval()
        self.max_len, self.device = max_len, device
        self.dim = self.model.config.d_model
        self.pooled_dim = None

    @torch.no_grad()
    def encode(self, texts: list[str], truncate: bool = True) -> list[EncodedText]:
        """``texts`` -> per text ``tokens [L, d_model]`` float32, L <= max_len (EOS included)."""
        check_length(self.tokenizer, texts, self.max_len, "T5", "T5TextEncoder", truncate)
        tok = self.tokenizer(texts, max_length=self.max_len, padding="max_length", truncation=True,
                             return_tensors="pt").to(self.device)
        states = self.model(**tok).last_hidden_state.float()
        return [EncodedText(states[i, : int(tok.attention_mask[i].sum())]) for i in range(len(texts))]


class SD3TextEncoder:
    """SD3's prompt embedding (diffusers ``StableDiffusion3Pipeline.encode_prompt``) from a pipeline folder:
    CLIP-L (``text_encoder/``, ``tokenizer/``), CLIP-G (``text_encoder_2/``, ``tokenizer_2/``) and optionally
    T5 (``text_encoder_3/``, ``tokenizer_3/``), all loaded with ``transformers``.

    Per text: ``tokens [77 + t5_len, width]``: both CLIPs' penultimate hidden states joined on the channel axis,
    zero-padded to ``width`` (T5's d_model = the transformer's ``joint_attention_dim``), then T5's ``t5_len``
    states (zeros without T5, as diffusers does); every row, padding included (SD3 attends to all of them).
    ``pooled [P]``: both CLIPs' projected pooled outputs joined. Raises FileNotFoundError for a missing
    sub-folder, ValueError if the CLIP widths exceed ``width``.
    """

    def __init__(self, folder: str | Path, width: int, t5: bool = True, t5_len: int = 256, device: str = "cpu",
                 dtype=torch.float32):
        transformers = require("transformers", "dev", "SD3TextEncoder (pip install transformers sentencepiece)")
        folder = Path(folder)
        self.clips = []
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            model = _local(transformers.CLIPTextModelWithProjection, folder / enc, f"SD3 CLIP {enc}", dtype=dtype)
            self.clips.append((_local(transformers.CLIPTokenizer, folder / tok, f"SD3 CLIP {tok}"),
                               model.to(device).eval()))
        self.t5 = None
        if t5:
            self.t5 = (_local(transformers.AutoTokenizer, folder / "tokenizer_3", "SD3 T5 tokenizer_3"),
                       _local(transformers.T5EncoderModel, folder / "text_encoder_3", "SD3 T5 text_encoder_3",
                              dtype=dtype).to(device).eval())
            if self.t5[1].config.d_model != width:
                raise ValueError(f"{folder}: T5's d_model {self.t5[1].config.d_model} differs from the transformer's "
                                 f"joint_attention_dim {width}")
        clip_width = sum(m.config.hidden_size for _, m in self.clips)
        if clip_width > width:
            raise ValueError(f"{folder}: the CLIP hidden states ({clip_width} wide together) do not fit the "
                             f"transformer's joint_attention_dim {width}")
        self.dim, self.t5_len, self.device = width, t5_len, device
        self.pooled_dim = sum(m.config.projection_dim for _, m in self.clips)
        self.clip_len = self.clips[0][0].model_max_length  # 77: diffusers' tokenizer_max_length

    @torch.no_grad()
    def encode(self, texts: list[str], truncate: bool = True) -> list[EncodedText]:
        """``texts`` -> per text ``tokens [clip_len + t5_len, dim]`` and ``pooled [pooled_dim]``, float32."""
        states, pooled = [], []
        for tokenizer, model in self.clips:
            check_length(tokenizer, texts, self.clip_len, "CLIP", "SD3TextEncoder", truncate)
            ids = tokenizer(texts, padding="max_length", max_length=self.clip_len, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = model(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].float())  # diffusers' default clip_skip: the penultimate layer
            pooled.append(out[0].float())
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.dim - clip.shape[-1]))
        if self.t5 is None:
            t5 = clip.new_zeros(len(texts), self.t5_len, self.dim)
        else:
            tokenizer, model = self.t5
            check_length(tokenizer, texts, self.t5_len, "T5", "SD3TextEncoder", truncate)
            ids = tokenizer(texts, padding="max_length", max_length=self.t5_len, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = model(ids)[0].float()
        tokens, pooled = torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)
        return [EncodedText(tokens[i], pooled[i]) for i in range(len(texts))]


def indicator_table(encoder, n: int = 10) -> Tensor:
    """ACE's image-indicator table: the encoder state at token 0 of ``{image}``, ``{image1}``, ..."""
    names = ["{image}"] + [f"{{image{i}}}" for i in range(1, n)]
    return torch.stack([e.tokens[0] for e in encoder.encode(names)])
