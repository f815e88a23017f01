"""omniace.kernels: the ops the models call (``ops.py``), their references and fast backends."""
from .ops import available_backends, editnet_inject, register_backend, rope3d, segment_attention, use_backend

__all__ = ["rope3d", "segment_attention", "editnet_inject", "register_backend", "available_backends", "use_backend"]
