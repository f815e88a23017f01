"""omniace.kernels: the ops the models call (``ops.py``), their references and fast backends."""
if __name__ == "omniace.kernels":
    from .ops import available_backends, editnet_inject, register_backend, rope3d, segment_attention, use_backend

    __all__ = ["rope3d", "segment_attention", "editnet_inject", "register_backend", "available_backends",
               "use_backend"]
else:
    # The checkout's root was on sys.path (python run from the repository) and a library probed for a top-level
    # ``kernels`` package (transformers and diffusers import Hugging Face's to read its version). Executing this
    # folder again under that name registered the omniace:: custom ops a second time, which corrupted torch's
    # dispatcher: later kernel calls crashed. Under any other name it is an empty package with no submodules.
    __path__ = []
    __all__ = []
