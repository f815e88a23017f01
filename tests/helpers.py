import torch
from PIL import Image, ImageDraw


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Non-zero weights everywhere (incl. zero-initialised outputs and EditNet injections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (std if p.dim() > 1 else 0.5))
    return module


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """int32 offsets ``[0, l0, l0 + l1, ...]`` of segment lengths."""
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def tiny_ace_case(seed: int = 0):
    """A randomised ace-tiny model and a packed batch of two samples (condition images, masks, history)."""
    from omniace.engine import build_model, get_config
    from omniace.engine.lcu import ConditionUnit, ImageInput, LCUSample, pack

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    model = randomise(build_model(get_config("ace-tiny", in_channels=3, y_channels=12)), seed)
    samples = [
        LCUSample([ConditionUnit("", [ImageInput(r(3, 4, 8), (r(4, 8) > 0).float())], text=r(5, 12)),
                   ConditionUnit("", [ImageInput(r(3, 6, 6))], text=r(9, 12))], ImageInput(r(3, 6, 10))),
        LCUSample([ConditionUnit("", [], text=r(7, 12))], ImageInput(r(3, 2, 14))),
    ]
    batch = pack(samples, 2, with_mask=True)
    return model, batch, batch.target_tokens(), torch.tensor([3.0, 700.0])


def demo_scene(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A small procedural scene (background, a red circle, a green square)."""
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (width, height), (200, 220, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, height * 2 // 3, width, height], fill=(90, 160, 90))
    x = int(torch.randint(8, width // 2, (1,), generator=g))
    d.ellipse([x, 12, x + 24, 36], fill=(220, 40, 40))
    d.rectangle([width - 32, 24, width - 12, 44], fill=(40, 180, 60))
    return img
