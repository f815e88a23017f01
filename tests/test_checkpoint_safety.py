"""Loading a DCP checkpoint never executes pickled code (issue 15, item 1).

Every payload below runs a shell command under stock ``torch.distributed.checkpoint`` loading; the tests prove
that for the issue's instance (so they can fail), then assert that omniace's reader refuses each one, names
what it references, and that the command never ran. A real checkpoint still loads, non-tensor entries included.
"""
import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from omniace.train.checkpoint import dcp_load, export_checkpoint, main as export_main, read_dcp_metadata

DCP_META = "torch.distributed.checkpoint.metadata"


def _str(s: str) -> bytes:  # SHORT_BINUNICODE
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def stack_global(module: str, name: str, cmd: str) -> bytes:
    """Protocol 4: STACK_GLOBAL resolves a dotted ``name`` attribute by attribute inside ``module``."""
    return b"\x80\x04" + _str(module) + _str(name) + b"\x93" + _str(cmd) + b"\x85R."


def text_global(module: str, name: str, cmd: str) -> bytes:
    """The text GLOBAL opcode (``c module\\nname\\n``) under PROTO 4, so dotted names resolve too."""
    return b"\x80\x04c" + f"{module}\n{name}\n".encode() + _str(cmd) + b"\x85R."


def inst(module: str, name: str, cmd: str) -> bytes:
    """INST: MARK, args, ``i module\\nname\\n`` calls the class with the args."""
    return b"\x80\x04(" + _str(cmd) + b"i" + f"{module}\n{name}\n".encode() + b"."


def obj(module: str, name: str, cmd: str) -> bytes:
    """OBJ: MARK, the callable (pushed by GLOBAL), args, ``o``."""
    return b"\x80\x04(c" + f"{module}\n{name}\n".encode() + _str(cmd) + b"o."


PAYLOADS = {
    "issue: os.system inside the allowed DCP module (STACK_GLOBAL)": (stack_global, DCP_META, "os.system"),
    "the same with the text GLOBAL opcode": (text_global, DCP_META, "os.system"),
    "torch.serialization reaches os": (stack_global, "torch.serialization", "os.system"),
    "pathlib reaches os": (stack_global, "pathlib", "os.system"),
    "the DCP filesystem module reaches os": (stack_global, "torch.distributed.checkpoint.filesystem", "os.system"),
    "torch reaches builtins.exec": (stack_global, "torch", "serialization.__builtins__.exec"),
    "torch.load itself": (stack_global, "torch", "load"),
    "a DCP class's module globals": (stack_global, DCP_META, "Metadata.__init__.__globals__"),
    "INST on os.system": (inst, "os", "system"),
    "INST, dotted inside an allowed module": (inst, DCP_META, "os.system"),
    "OBJ on os.system": (obj, "os", "system"),
    "OBJ, dotted inside an allowed module": (obj, "torch.serialization", "os.system"),
}


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """A DCP checkpoint with tensors and the non-tensor entries an optimizer state holds."""
    path = tmp_path_factory.mktemp("dcp") / "step_00000004"
    state = {"model": {"w": torch.randn(5, 3), "b": torch.arange(7.0)},
             "optim": {"lr": 3e-4, "betas": (0.9, 0.999), "params": ["w", "b"], "foreach": None, "amsgrad": False}}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path, state


def _crafted(tmp_path, real, payload: bytes):
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    shutil.copytree(real, ckpt)
    (ckpt / ".metadata").write_bytes(payload)
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "model_config": {"family": "ace"}}))
    return ckpt


def test_the_issue_instance_runs_code_under_stock_dcp(real_checkpoint, tmp_path):
    """The threat is real: torch's own reader executes the payload (so the refusals below can fail)."""
    marker = tmp_path / "pwned"
    ckpt = _crafted(tmp_path, real_checkpoint[0], stack_global(DCP_META, "os.system", f"touch {marker}"))
    try:
        FileSystemReader(str(ckpt)).read_metadata()
    except Exception:  # noqa: BLE001 - the payload returns an int, not a Metadata: torch fails after running it
        pass
    assert marker.exists()


@pytest.mark.parametrize("case", list(PAYLOADS))
def test_a_crafted_index_is_refused_without_running_it(case, real_checkpoint, tmp_path):
    build, module, name = PAYLOADS[case]
    marker = tmp_path / "pwned"
    ckpt = _crafted(tmp_path, real_checkpoint[0], build(module, name, f"touch {marker}"))
    expected = f"its .metadata pickle references {module}.{name}, which a DCP index never holds"
    for attempt in (lambda: read_dcp_metadata(ckpt),
                    lambda: dcp_load({"model": {"w": torch.empty(5, 3)}}, ckpt, no_dist=True),
                    lambda: export_checkpoint(ckpt, tmp_path / "out.safetensors"),
                    lambda: export_main([str(ckpt.parent), str(tmp_path / "out.safetensors")])):
        with pytest.raises(ValueError) as err:
            attempt()
        assert expected in str(err.value) and str(ckpt) in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_a_crafted_non_tensor_entry_is_refused(real_checkpoint, tmp_path):
    """The index is clean but an entry's bytes (``torch.load(weights_only=False)`` in stock DCP) run code."""
    real, _ = real_checkpoint
    ckpt = tmp_path / "ckpt"
    shutil.copytree(real, ckpt)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    md = FileSystemReader(str(ckpt)).read_metadata()
    index = next(k for k in md.storage_data if k.fqn == "optim.lr")
    info = md.storage_data[index]
    shard = ckpt / info.relative_path
    buf = __import__("io").BytesIO()
    torch.save(Evil(), buf)
    info.offset, info.length = shard.stat().st_size, len(buf.getvalue())
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md.storage_meta = None
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)

    state = {"model": {"w": torch.empty(5, 3), "b": torch.empty(7)},
             "optim": {"lr": 0.0, "betas": (0.0, 0.0), "params": [], "foreach": None, "amsgrad": True}}
    with pytest.raises(ValueError, match=r"entry 'optim.lr' needs pickled code to load"):
        dcp_load(state, ckpt, no_dist=True)
    assert not marker.exists()
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)  # stock DCP runs it: the check can fail
    assert marker.exists()


def test_a_shard_path_outside_the_folder_is_refused(real_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(real_checkpoint[0], ckpt)
    md = FileSystemReader(str(ckpt)).read_metadata()
    md.storage_meta = None
    next(iter(md.storage_data.values())).relative_path = "../secret.distcp"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(ValueError, match=r"reads '\.\./secret\.distcp', not a file inside the checkpoint folder"):
        read_dcp_metadata(ckpt)


def test_a_real_checkpoint_still_loads_through_the_safe_reader(real_checkpoint):
    path, saved = real_checkpoint
    state = {"model": {"w": torch.empty(5, 3), "b": torch.empty(7)},
             "optim": {"lr": 0.0, "betas": (0.0, 0.0), "params": [], "foreach": True, "amsgrad": True}}
    dcp_load(state, path, no_dist=True)
    assert torch.equal(state["model"]["w"], saved["model"]["w"]) and torch.equal(state["model"]["b"], saved["model"]["b"])
    assert state["optim"] == saved["optim"]


def test_a_trainer_resume_refuses_a_crafted_checkpoint(tmp_path):
    """The issue's instance through ``omniace-train``'s resume: a real run's checkpoint with its index replaced."""
    from omniace.train.synthetic import write_corpus

    data, out, marker = tmp_path / "data", tmp_path / "run", tmp_path / "pwned"
    write_corpus(data, 16, shard_size=16, log=lambda m: None, seed=3, fmt="png")
    args = [sys.executable, "-m", "omniace.train.trainer", "--data", str(data), "--out", str(out), "--ckpt-every", "2",
            "--decoder", "pil", "--token-budget", "300", "--no-activation-checkpointing"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(args + ["--steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = out / "checkpoints" / "step_00000002"
    (ckpt / ".metadata").write_bytes(stack_global(DCP_META, "os.system", f"touch {marker}"))
    resumed = subprocess.run(args + ["--steps", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode != 0
    assert f"its .metadata pickle references {DCP_META}.os.system" in resumed.stdout + resumed.stderr
    assert not marker.exists()


def test_a_shard_whose_schema_carries_a_pickled_extension_type_is_read_as_data(tmp_path):
    """CVE-2023-47248: pyarrow < 14.0.1 unpickled ``arrow.py_extension_type`` field metadata on read.

    Every path that reads a user's shard goes through ``RecordStream``; with the pinned pyarrow the payload stays
    bytes in the schema and never runs.
    """
    import os

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from omniace.train.data import RecordStream
    from omniace.train.omniedit_format import omniedit_schema

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    schema = omniedit_schema(extras=False)
    i = schema.get_field_index("src_img")
    schema = schema.set(i, schema.field(i).with_metadata({b"ARROW:extension:name": b"arrow.py_extension_type",
                                                          b"ARROW:extension:metadata": pickle.dumps(Evil())}))
    row = {"omni_edit_id": "a", "task": "style_transfer", "src_img": {"bytes": b"x", "path": "a.png"},
           "edited_img": {"bytes": b"y", "path": "b.png"}, "edited_prompt_list": ["p"], "width": 8, "height": 8,
           "sc_score_1": 9, "sc_score_2": 9, "sc_reasoning": "", "pq_score": 9, "pq_reasoning": "", "o_score": 9.0}
    pq.write_table(pa.Table.from_pylist([row], schema=schema), tmp_path / "x.parquet")
    (key, got), = [kv for kv, _ in zip(RecordStream([str(tmp_path)], seed=0), range(1))]
    assert got["src_img"]["bytes"] == b"x"
    assert not marker.exists()


def _build_on_class() -> bytes:
    """GLOBAL pathlib.PosixPath, then BUILD (None, {'_str': '/HIJACKED'}): sets a class attribute for the process."""
    return b"\x80\x04cpathlib\nPosixPath\nN}" + _str("_str") + _str("/HIJACKED") + b"s\x86b."


def test_a_crafted_index_cannot_rewrite_an_allowed_class(real_checkpoint, tmp_path):
    import pathlib

    script = ("import pickle, pathlib, sys; pickle.loads(sys.stdin.buffer.read()); "
              "print(str(pathlib.PosixPath('/a/b')))")
    control = subprocess.run([sys.executable, "-c", script], input=_build_on_class(), capture_output=True)
    assert control.stdout.decode().strip() == "/HIJACKED"  # stock pickle rewrites the class: the check can fail
    ckpt = _crafted(tmp_path, real_checkpoint[0], _build_on_class())
    with pytest.raises(ValueError, match=r"its .metadata pickle sets attributes of <class 'pathlib.PosixPath'>"):
        read_dcp_metadata(ckpt)
    assert str(pathlib.PosixPath("/a/b")) == "/a/b" and "_str" not in vars(pathlib.PosixPath)


def test_the_export_command_refuses_in_one_line(real_checkpoint, tmp_path):
    ckpt = _crafted(tmp_path, real_checkpoint[0], b"\x80\x04" + _str("x") + b"Q.")  # BINPERSID
    proc = subprocess.run([sys.executable, "-m", "omniace.train.checkpoint", str(ckpt), str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "its .metadata pickle uses a persistent id, which a DCP index never holds" in proc.stderr
