"""omniace.engine: packed LCU batch, ACE and SD3(+EditNet) models, samplers, pipeline."""
from .config import ACEConfig, SD3Config, get_config
from .lcu import ConditionUnit, ImageInput, LCUSample, PackedLCU, pack
from .model import build_model, load_model, save_model

__all__ = ["ACEConfig", "SD3Config", "get_config", "ConditionUnit", "ImageInput", "LCUSample", "PackedLCU",
           "pack", "build_model", "load_model", "save_model"]
