"""Model configs (dataclasses) and named presets."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace


PREDICTION_TYPES = ("eps", "x0", "flow")  # what a model predicts; engine.sampler.PREDICTIONS is this tuple


def check_sizes(cfg, integers: tuple[str, ...], numbers: tuple[str, ...] = ()) -> None:
    """ValueError naming the first of ``integers`` that is not an integer >= 1, or of ``numbers`` that is not a
    finite number > 0, or a ``prediction`` outside PREDICTION_TYPES: a zero or negative size would otherwise
    fail deep inside the model build (or train a model with no blocks) instead of naming the field."""
    for name in integers:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    for name in numbers:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if cfg.prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction {cfg.prediction!r}; expected one of {PREDICTION_TYPES}")


def ace_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """ACE's split of the head dim over (frame, row, col): the frame axis takes the remainder."""
    third = 2 * (head_dim // 6)
    return (head_dim - 2 * third, third, third)


@dataclass(frozen=True)
class ACEConfig:
    """PixArt-alpha style adaLN-single DiT with long-context self-attention and per-frame cross-attention."""

    family: str = "ace"
    patch_size: int = 2
    in_channels: int = 4  # latent channels; the patch embedder also takes one mask channel
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pred_sigma: bool = True  # output channels doubled; only the first half is used
    y_channels: int = 4096  # text encoder width (T5-XXL)
    text_len: int = 120
    qk_norm: bool = True
    norm_q_for_k: bool = True  # the released model normalises k with norm_q (norm_k is saved but unused)
    rope_axes: tuple[int, int, int] | None = None  # None: ACE's split of the head dim
    rope_theta: float = 10000.0
    num_indicators: int = 10
    codec_factor: int = 8  # pixels per latent pixel of the paired codec
    prediction: str = "eps"
    # add the source image (the current unit's first image, when target-sized) to the output: the model
    # predicts the edit as a change to its input. Only with x0 prediction (the output is then an image).
    source_skip: bool = False
    # with source_skip: the output's second (learned-sigma) half is a per-element gate logit, and the model
    # returns ``source + sigmoid(gate) * change``; a saturated gate leaves unchanged pixels exactly the source
    source_gate: bool = False
    # the built-in encoder of the pixel-space presets (engine.pipeline.tiny_text_encoder): "bytes" or "words"
    text_encoder: str = "bytes"
    # with source_skip on a pixel codec (in_channels = 3 * codec_factor**2): > 0 replaces the final linear's
    # per-token output by ``pixel_head`` features per pixel, and a per-pixel MLP (width 2 * pixel_head) maps
    # them with that pixel's source and noisy values to its change (and gate). An 8x8-pixel token then edits
    # along the source's own edges, which a per-token linear head draws as blocks. 0: off (ACE's head).
    pixel_head: int = 0
    # with pixel_head: > 0 adds ``pixel_smooth`` features per token, upsampled bilinearly across the token grid
    # and fed to the per-pixel MLP, so an unsure token fades into its neighbours instead of showing as a square
    # (``engine.ace.PixelHead``); reads ``PackedLCU.target_neighbors``. 0: off
    pixel_smooth: int = 0
    # with pixel_head: > 0 adds ``pixel_keys`` colours per token (3 values each); each pixel's MLP also reads how
    # close its source colour is to each key, ``1 / (1 + |source - key|^2 / KEY_WIDTH)``, so a token can select
    # the source's pixels of one colour (the object to recolour or remove) and edit along their exact edges, a
    # product of token and pixel values that the MLP's sum of the two cannot form (``engine.ace.PixelHead``). 0: off
    pixel_keys: int = 0
    # with pixel_head: > 0 feeds each pixel's MLP the linear least-squares (Wiener) estimate of its change from its
    # noisy value, ``c(t) (x_t - alpha_t source)`` with ``c = alpha sigma_data^2 / (alpha^2 sigma_data^2 + sigma^2)``
    # (EDM's c_skip, Karras et al. 2022, in variance-preserving form with the source as the prior mean). At low noise
    # it is the change itself, so a sharp edge in x_t reaches the output through one linear map instead of a product
    # of timestep and pixel the MLP cannot form (``engine.ace.PixelHead``). The value is sigma_data; 0: off
    pixel_sigma_data: float = 0.0
    # with pixel_head: > 0 feeds each pixel's MLP ``pixel_conv`` features of a learned 5x5 convolution over the
    # image's noisy and source RGB around it (``engine.ace.PixelHead``; reads ``PackedLCU.target_neighbors``). One
    # noisy pixel tells little; its neighbourhood shows the edges and corners that tell a square from a circle. 0: off
    pixel_conv: int = 0
    # with source_skip: each target token's embedding also adds a linear map of its cell of the source image (zeros
    # where the sample has none): InstructPix2Pix's channel concatenation (Brooks et al., 2023) per token, as a
    # linear over [x_t, mask, source] is the sum of one over each. The target token then holds its source cell
    # from the first layer instead of finding it through self-attention. False: off (ACE: the source is only in
    # the sequence).
    source_concat: bool = False
    # self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits", sec. 3): the target tokens' embedding and the
    # per-pixel head also read the model's own previous x0 estimate (zeros at the first sampling step; in training,
    # half the steps run a first forward without gradient to make it). A pure-noise input says where nothing is;
    # the previous estimate says what the model already drew, so each call refines one drawing instead of
    # redrawing the average (a soft, round blob) from the noisy input alone. Only with x0 prediction. False: off
    self_condition: bool = False
    # absolute coordinates (PixArt-alpha's fixed 2D sin-cos position embedding, Chen et al. 2023, which ACE's 3D
    # RoPE replaced): each image token's embedding adds ``engine.ace.sincos_2d`` of its (row, col) in its frame, and
    # with pixel_head each pixel's MLP also reads its own (row, col) in units of COORD_UNIT tokens. RoPE gives
    # attention relative offsets but leaves no position in a token's state, so "where the object's edge falls
    # inside me" (a square's corner against a circle's) must be inferred; with coordinates in the state and at
    # every pixel the MLP can draw a shape from its centre and size with a few linear pieces, as CoordConv
    # (Liu et al., 2018) lets a network place what it draws. Needs hidden_size divisible by 4. False: off (ACE)
    absolute_coords: bool = False
    # transformer layers over each frame's text before the blocks (``engine.ace.TextRefinerLayer``): context for
    # a text encoder that gives none (the word-level encoder); 0: off (ACE reads T5 states as they are)
    text_refiner: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def axes(self) -> tuple[int, int, int]:
        return self.rope_axes or ace_rope_axes(self.head_dim)

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.pred_sigma else 1)

    def __post_init__(self) -> None:
        check_sizes(self, ("patch_size", "in_channels", "hidden_size", "depth", "num_heads", "y_channels",
                           "text_len", "num_indicators", "codec_factor"), ("mlp_ratio", "rope_theta"))
        if self.hidden_size % self.num_heads or self.head_dim % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size")
        if sum(self.axes) > self.head_dim:
            raise ValueError(f"rope_axes {self.axes} exceed the head dim {self.head_dim}")
        if self.source_skip and self.prediction != "x0":
            raise ValueError(f"source_skip adds the source image to the output, which must then be an image: "
                             f"prediction must be 'x0', got {self.prediction!r}")
        if self.text_encoder not in ("bytes", "words"):
            raise ValueError(f"text_encoder {self.text_encoder!r}; expected 'bytes' or 'words'")
        if self.source_gate and not (self.source_skip and self.pred_sigma):
            raise ValueError("source_gate reads the gate from the learned-sigma half of the output: it needs "
                             "source_skip=True and pred_sigma=True")
        for name, note in (("pixel_head", "0 = off"), ("pixel_smooth", "0 = off"), ("pixel_keys", "0 = off"),
                           ("pixel_conv", "0 = off"), ("text_refiner", "layers; 0 = off")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 ({note}), got {value!r}")
        if self.pixel_head and not (self.source_skip and self.in_channels == 3 * self.codec_factor**2):
            raise ValueError(f"pixel_head reads each pixel's source value: it needs source_skip=True (with "
                             f"prediction='x0') and a pixel codec (in_channels = 3 * codec_factor**2 = "
                             f"{3 * self.codec_factor**2}), got source_skip={self.source_skip}, "
                             f"prediction={self.prediction!r}, in_channels={self.in_channels}")
        if self.pixel_smooth and not self.pixel_head:
            raise ValueError(f"pixel_smooth feeds the per-pixel head: it needs pixel_head > 0, got "
                             f"pixel_smooth={self.pixel_smooth}, pixel_head={self.pixel_head}")
        if isinstance(self.pixel_sigma_data, bool) or not isinstance(self.pixel_sigma_data, (int, float)) or not (
                math.isfinite(self.pixel_sigma_data) and self.pixel_sigma_data >= 0):
            raise ValueError(f"pixel_sigma_data must be a finite number >= 0 (0 = off), got {self.pixel_sigma_data!r}")
        if self.pixel_sigma_data and not self.pixel_head:
            raise ValueError(f"pixel_sigma_data feeds the per-pixel head: it needs pixel_head > 0, got "
                             f"pixel_sigma_data={self.pixel_sigma_data}, pixel_head={self.pixel_head}")
        if self.pixel_conv and not self.pixel_head:
            raise ValueError(f"pixel_conv feeds the per-pixel head: it needs pixel_head > 0, got "
                             f"pixel_conv={self.pixel_conv}, pixel_head={self.pixel_head}")
        if not isinstance(self.source_concat, bool):
            raise ValueError(f"source_concat must be True or False, got {self.source_concat!r}")
        if self.source_concat and not self.source_skip:
            raise ValueError(f"source_concat reads each target token's source cell (source_index): it needs a "
                             f"model with the source skip (source_skip=True, prediction='x0'; the ace-edit preset), "
                             f"got source_skip={self.source_skip}, prediction={self.prediction!r}")
        if not isinstance(self.absolute_coords, bool):
            raise ValueError(f"absolute_coords must be True or False, got {self.absolute_coords!r}")
        if self.absolute_coords and self.hidden_size % 4:
            raise ValueError(f"absolute_coords splits the hidden size into sin and cos of rows and columns: it "
                             f"needs hidden_size divisible by 4, got {self.hidden_size}")
        if not isinstance(self.self_condition, bool):
            raise ValueError(f"self_condition must be True or False, got {self.self_condition!r}")
        if self.self_condition and self.prediction != "x0":
            raise ValueError(f"self_condition feeds the model its previous x0 estimate: it needs prediction='x0', "
                             f"got {self.prediction!r}")
        if self.pixel_keys and not self.pixel_head:
            raise ValueError(f"pixel_keys feeds the per-pixel head: it needs pixel_head > 0, got "
                             f"pixel_keys={self.pixel_keys}, pixel_head={self.pixel_head}")


@dataclass(frozen=True)
class SD3Config:
    """SD3 MMDiT (diffusers ``SD3Transformer2DModel`` layout), optionally with an EditNet control branch."""

    family: str = "sd3"
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 192
    qk_norm: str | None = None  # None or "rms_norm" (per head)
    # MMDiT-X (SD3.5 Medium): these blocks add a second, image-only self-attention (diffusers' attn2)
    dual_attention_layers: tuple[int, ...] = ()
    text_len: int = 333  # text tokens per prompt (SD3: 77 CLIP + 256 T5)
    editnet: bool = True
    # how the control branch conditions the base (OmniEdit table 7): "editnet" (sees the main tokens of
    # every block, injects into the image and text streams) or "controlnet" (a parallel branch on the
    # input embedding plus the condition, injecting into the image stream only)
    control: str = "editnet"
    # channel-concatenation conditioning (InstructPix2Pix style): the source latent joins the noisy
    # target's channels in the patch embedding; no control branch
    concat_condition: bool = False
    codec_factor: int = 8
    prediction: str = "flow"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def __post_init__(self) -> None:
        check_sizes(self, ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers",
                           "attention_head_dim", "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                           "pooled_projection_dim", "pos_embed_max_size", "text_len", "codec_factor"))
        # a JSON config (diffusers' config.json, omniace_config metadata) gives a list
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        bad = [i for i in self.dual_attention_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad or len(set(self.dual_attention_layers)) != len(self.dual_attention_layers):
            raise ValueError(f"dual_attention_layers {self.dual_attention_layers} must be distinct block indices in "
                             f"[0, {self.num_layers}) (num_layers {self.num_layers})")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {self.qk_norm!r} is not supported; expected None or 'rms_norm'")
        if self.control not in ("editnet", "controlnet"):
            raise ValueError(f"control {self.control!r}; expected 'editnet' or 'controlnet'")
        if self.concat_condition and self.editnet:
            raise ValueError("concat_condition replaces the control branch: set editnet=False with it")


PRESETS: dict[str, ACEConfig | SD3Config] = {
    "ace-0.6b-512": ACEConfig(),
    "ace-0.6b-1024": ACEConfig(),
    # Tiny: CPU tests and the embedded demo; pairs with the pixel codec (factor 4, 48 channels).
    "ace-tiny": ACEConfig(in_channels=48, hidden_size=64, depth=2, num_heads=4, y_channels=32,
                          text_len=64, codec_factor=4),
    # Small: an earlier embedded default; wide enough that a 192-value pixel patch fits.
    # It predicts x0: through a DiT with no skip connection an eps error grows by sigma/alpha into the image.
    "ace-small": ACEConfig(in_channels=48, hidden_size=192, depth=4, num_heads=4, y_channels=32,
                           text_len=64, codec_factor=4, prediction="x0"),
    # The embedded default's model (omniace demo): ace-small predicting a gated change to the source image
    # (source_skip), drawn per pixel (pixel_head) from per-pixel and bilinearly upsampled per-token features
    # (pixel_smooth), with word-level text (docs/default_model.md says why)
    "ace-edit": ACEConfig(in_channels=48, hidden_size=192, depth=4, num_heads=4, y_channels=32,
                          text_len=64, codec_factor=4, prediction="x0", source_skip=True, source_gate=True,
                          text_encoder="words", pixel_head=16, pixel_smooth=16),
    "sd3-medium-editnet": SD3Config(),
    # SD3.5 (diffusers configs of stabilityai/stable-diffusion-3.5-medium and -large, transformer/config.json):
    # Medium is MMDiT-X (dual attention in blocks 0-12, 384-wide positional table), Large is a wider, deeper MMDiT;
    # both normalise q and k with RMSNorm
    "sd35-medium-editnet": SD3Config(pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd35-large-editnet": SD3Config(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                    qk_norm="rms_norm"),
    "sd3-tiny-editnet": SD3Config(sample_size=32, in_channels=48, out_channels=48, num_layers=2,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                  caption_projection_dim=64, pooled_projection_dim=32,
                                  pos_embed_max_size=32, text_len=64, codec_factor=4),
}
PRESETS["tiny"] = PRESETS["ace-tiny"]
# the OmniEdit table-7 ablation: one small MMDiT base, conditioned three ways
PRESETS["sd3-small"] = SD3Config(sample_size=32, in_channels=48, out_channels=48, num_layers=3,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32,
                                 caption_projection_dim=128, pooled_projection_dim=32, pos_embed_max_size=32,
                                 text_len=64, codec_factor=4, editnet=False, prediction="x0")
PRESETS["sd3-small-editnet"] = replace(PRESETS["sd3-small"], editnet=True)
PRESETS["sd3-small-controlnet"] = replace(PRESETS["sd3-small"], editnet=True, control="controlnet")
PRESETS["sd3-small-concat"] = replace(PRESETS["sd3-small"], concat_condition=True)


def get_config(name: str, **overrides) -> ACEConfig | SD3Config:
    """Preset ``name`` with ``overrides`` applied. ValueError for an unknown preset, a field its family does not
    have (``pixel_smooth`` on an SD3 preset) or a bad value (the config's own checks)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    base = PRESETS[name]
    unknown = sorted(set(overrides) - {f.name for f in fields(base)})
    if unknown:
        raise ValueError(f"preset {name!r} ({type(base).__name__}) has no field {', '.join(map(repr, unknown))}; "
                         f"its fields: {', '.join(f.name for f in fields(base))}")
    return replace(base, **overrides)


def parse_overrides(name: str, entries: list[str]) -> dict:
    """``["FIELD=VALUE", ...]`` (a command line's) as ``get_config`` overrides of preset ``name``, each value read as
    its field's type there: int, float, str, or bool (true/false/1/0). ValueError naming an entry that is not
    FIELD=VALUE, a field the preset lacks, a field given twice, a value that does not parse, or a field with no
    scalar type (a tuple or None default). The config's own checks run in ``get_config``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    base, out = PRESETS[name], {}
    names = [f.name for f in fields(base)]
    for entry in entries:
        key, sep, text = (part.strip() for part in entry.partition("="))
        if not sep or not key:
            raise ValueError(f"model override {entry!r}: expected FIELD=VALUE")
        if key not in names:
            raise ValueError(f"model override {entry!r}: preset {name!r} ({type(base).__name__}) has no field "
                             f"{key!r}; its fields: {', '.join(names)}")
        if key in out:
            raise ValueError(f"model override {entry!r}: {key} is already set to {out[key]!r}; give each field once")
        if key == "family":
            raise ValueError(f"model override {entry!r}: the family cannot be changed (the fields differ); pick a "
                             f"preset of that family: {', '.join(sorted(PRESETS))}")
        current = getattr(base, key)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text.lower() in ("true", "1")
            elif isinstance(current, (int, float, str)):
                value = type(current)(text)
            else:
                raise TypeError
        except ValueError:
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(current)]
            raise ValueError(f"model override {entry!r}: {text!r} is not {kind} (the type of {key} in preset "
                             f"{name!r})") from None
        except TypeError:
            raise ValueError(f"model override {entry!r}: {key} (default {current!r}) cannot be set from the command "
                             f"line; add a preset to engine/config.py") from None
        out[key] = value
    return out


def config_to_dict(cfg: ACEConfig | SD3Config) -> dict:
    return asdict(cfg)


def recorded_config(d: dict) -> dict:
    """A config dict as written by an older version (a checkpoint's or an export's record), with the fields
    added since at their defaults, which compute what that version did (``self_condition`` False, ...): the
    dict to compare with a current :func:`config_to_dict`. ``d`` unchanged when it is no valid config (a field
    this version does not know, a bad value): the comparison then names what differs."""
    try:
        return config_to_dict(config_from_dict(d))
    except (TypeError, ValueError):
        return d


def config_differences(record: dict, cfg: ACEConfig | SD3Config, mine: str = "this model") -> list[str]:
    """The fields in which a recorded config dict (a checkpoint's or an export's, read through
    :func:`recorded_config`) differs from ``cfg``, each as ``"depth 3 (this model: 2)"``; empty when they agree."""
    import json

    record = json.loads(json.dumps(recorded_config(record)))  # tuples as a JSON record's lists
    own = json.loads(json.dumps(config_to_dict(cfg)))
    show = lambda d, k: repr(d[k]) if k in d else "absent"
    return [f"{k} {show(record, k)} ({mine}: {show(own, k)})"
            for k in [*own, *(k for k in record if k not in own)] if record.get(k, ...) != own.get(k, ...)]


def config_from_dict(d: dict) -> ACEConfig | SD3Config:
    d = dict(d)
    family = d.get("family")
    cls = {"ace": ACEConfig, "sd3": SD3Config}.get(family)
    if cls is None:
        raise ValueError(f"config family must be 'ace' or 'sd3', got {family!r}")
    if d.get("rope_axes") is not None:
        d["rope_axes"] = tuple(d["rope_axes"])
    return cls(**d)
