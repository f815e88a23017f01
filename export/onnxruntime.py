"""ONNX Runtime backend: run an exported ``portable`` denoiser behind EditServer's denoiser interface.

``OnnxRuntimeDenoiser(folder)`` loads ``folder/denoiser.onnx`` (from :func:`~omniace.export.onnx.export_onnx`)
with the CUDA execution provider when a GPU and ``onnxruntime-gpu`` are present, else the CPU one, and is
called like the model: ``(PackedLCU, x [L_tgt, C*p*p], t [B]) -> [L_tgt, C*p*p]``. :func:`onnx_for_model`
exports a model once into a cache folder keyed by its weights hash and refuses a folder exported from other
weights or another config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from omniace.engine.config import config_differences, config_from_dict
from omniace.engine.lcu import PackedLCU

from .onnx import GRAPH_FILE, META_FILE, export_onnx, file_sha256, graph_inputs, weights_hash


def _np_types() -> dict:
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}



def _ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("the onnxruntime backend needs onnxruntime: pip install 'omniace[export]'") from err
    return onnxruntime


def read_meta(folder: str | os.PathLike, verify_files: bool = True) -> dict:
    """``denoiser.json`` of an exported folder. With ``verify_files``, the graph and its external weights must
    be the files the export wrote (their SHA-256), so a swapped, truncated or missing ``.data`` file is refused
    before any runtime reads it. Raises ValueError naming the folder and what is wrong."""
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: not an exported denoiser folder ({path}: {err}); "
                         f"make one with `omniace export`") from None
    if verify_files:
        files = meta.get("files_sha256")
        if not isinstance(files, dict) or GRAPH_FILE not in files:
            raise ValueError(f"{folder}: {META_FILE} lists no file hashes; export again with `omniace export`")
        for name, want in files.items():
            f = Path(folder) / name
            if not f.is_file():
                raise ValueError(f"{folder}: {name} is missing; export again with `omniace export`")
            if file_sha256(f) != want:
                raise ValueError(f"{folder}: {name} is not the file this export wrote (its sha256 differs from "
                                 f"{META_FILE}'s); export again with `omniace export`")
    return meta


class OnnxRuntimeDenoiser:
    """An exported ``portable`` graph run by ONNX Runtime.

    Args:
        folder: an :func:`export_onnx` output folder.
        providers: ONNX Runtime execution providers; default CUDA when available, then CPU.
        threads: intra-op threads on the CPU (0: ONNX Runtime's default, one per core).
        verify_files: check the folder's files against the hashes ``denoiser.json`` records (see :func:`read_meta`).
    Raises ValueError for a ``plugin`` export (its ``omniace`` nodes need TensorRT or the reference evaluator), a
    bf16 export without the CUDA provider, or a folder ONNX Runtime cannot load, naming the folder.
    """

    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None, threads: int = 0,
                 verify_files: bool = True):
        ort = _ort()
        self.meta = read_meta(folder, verify_files)
        if self.meta["flavour"] != "portable":
            raise ValueError(f"{folder}: a {self.meta['flavour']!r} export; ONNX Runtime runs the 'portable' one "
                             f"(the plugin flavour is for TensorRT)")
        self.cfg = config_from_dict(self.meta["config"])
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        if self.meta["dtype"] == "bf16" and "CUDAExecutionProvider" not in providers:
            raise ValueError(f"{folder}: a bf16 export; ONNX Runtime's CPU provider has no bf16 kernels (Gemm, "
                             f"LayerNorm): export fp32 or fp16 for it, or run bf16 under the CUDA provider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(Path(folder) / GRAPH_FILE), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own classes (InvalidProtobuf, Fail ...)
            raise ValueError(f"{folder}: ONNX Runtime cannot load {GRAPH_FILE}: "
                             f"{' '.join(str(err).split())[:300]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, batch: PackedLCU, x: Tensor, t: Tensor, control_scale: float | Tensor = 1.0,
                 x0_prev: Tensor | None = None) -> Tensor:
        inputs = graph_inputs(self.cfg, batch, x, t, control_scale, x0_prev)
        if x.is_cuda and "CUDAExecutionProvider" in self.providers and self.meta["dtype"] != "bf16":
            return self._run_on_device(inputs, x)
        feed = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        out = self.session.run(["out"], feed)[0]
        return torch.from_numpy(out).to(x.device)

    def _run_on_device(self, inputs: dict[str, Tensor], x: Tensor) -> Tensor:
        """CUDA execution provider: bind the torch tensors' device memory (no host round trip). Not run here
        (no GPU with onnxruntime-gpu on the machines this was written on). fp32 and fp16 exports."""
        np_of = _np_types()
        binding = self.session.io_binding()
        keep = {name: inputs[name].contiguous() for name in self.input_names}
        for name, value in keep.items():
            binding.bind_input(name, "cuda", value.device.index or 0, np_of[value.dtype], tuple(value.shape),
                               value.data_ptr())
        out = torch.empty(tuple(x.shape), dtype=torch.float16 if self.meta["dtype"] == "fp16" else torch.float32,
                          device=x.device)
        binding.bind_output("out", "cuda", out.device.index or 0, np_of[out.dtype], tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # the inputs were written on torch's stream
        self.session.run_with_iobinding(binding)
        return out


def onnx_for_model(model: torch.nn.Module, folder: str | os.PathLike | None = None, dtype: str = "fp32",
                   log=print) -> Path:
    """A ``portable`` export of ``model``: ``folder`` if given (an ``omniace export`` folder of these weights),
    else a cache folder ``$OMNIACE_CACHE`` (default ``~/.cache/omniace``) ``/onnx/<weights hash>-<dtype>``,
    exported there once. Raises ValueError if the folder is no export, or one of other weights or another config,
    or its files are not the ones the export wrote, naming what differs."""
    digest = weights_hash(model)
    if folder is not None:  # the caller's export: used as it is, never written
        check_export(model, folder, "portable", digest)
        return Path(folder)
    root = Path(os.environ.get("OMNIACE_CACHE", Path.home() / ".cache" / "omniace"))
    folder = root / "onnx" / f"{digest[:16]}-{dtype}"
    if (folder / META_FILE).exists():
        try:
            check_export(model, folder, "portable", digest)
            return folder
        except ValueError as err:  # a cache entry an older version or an interrupted copy left: made again
            log(f"re-exporting the cached export ({err})")
    log(f"exporting the denoiser to ONNX in {folder} (once per weights)")
    export_onnx(model, folder, "portable", dtype)
    return folder


def check_export(model: torch.nn.Module, folder: str | os.PathLike, flavour: str | None = None,
                 digest: str | None = None) -> dict:
    """Refuse an export folder made from other weights, another config or (if given) another flavour:
    ValueError naming each difference. Returns its ``denoiser.json``."""
    meta = read_meta(folder)
    digest = digest or weights_hash(model)
    differs = []
    if meta.get("weights_sha256") != digest:
        differs.append(f"weights (sha256 {str(meta.get('weights_sha256'))[:12]} vs the model's {digest[:12]})")
    # an export written before a config field was added records none: the field's default is what it computed
    if not isinstance(meta.get("config"), dict):
        differs.append(f"model config (recorded: {meta.get('config')!r})")
    elif fields_differ := config_differences(meta["config"], model.cfg):
        differs.append(f"model config ({', '.join(fields_differ)})")
    if flavour is not None and meta.get("flavour") != flavour:
        differs.append(f"flavour {meta.get('flavour')!r} (need {flavour!r})")
    if differs:
        raise ValueError(f"{folder}: exported from a different model: " + "; ".join(differs)
                         + "; export again with `omniace export` or pass another folder")
    return meta
