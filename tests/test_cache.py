"""The latent cache (python -m omniace.train.cache): each row's VAE latents with the config's scaling and shift,
the loader's skips, atomic units that a rerun resumes, ranks sharing the units; the loader trains from it with the
Parquet loader's batches and exact resume; end to end, a tiny random AutoencoderKL folder -> a two-rank cache ->
a two-rank sd3-tiny-editnet run in latent space, killed and resumed bit for bit -> its export edits an image."""
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pyarrow")
diffusers = pytest.importorskip("diffusers")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

from omniace.engine.codec import AutoencoderKLCodec  # noqa: E402
from omniace.engine.config import get_config  # noqa: E402
from omniace.engine.pipeline import tiny_text_encoder, to_tensor  # noqa: E402
from omniace.engine.text import TinyTextEncoder  # noqa: E402
from omniace.train import cache as cache_mod  # noqa: E402
from omniace.train.cache import CacheConfig, build_cache, encode_batch  # noqa: E402
from omniace.train.data import DataConfig, EditLoader  # noqa: E402
from omniace.train.omniedit_format import omniedit_schema, write_shard  # noqa: E402
from omniace.train.synthetic import OMNIEDIT_TASKS, generate, write_corpus  # noqa: E402
from omniace.train.trainer import TrainConfig  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # lines reach the test as printed
ENC = TinyTextEncoder(32, pooled_dim=32, max_len=64)
QUIET = dict(log=lambda m: None)


def text_encode(texts):
    return ENC.encode(texts)


def tiny_vae(folder: Path, latent_channels: int = 48) -> Path:
    """A random diffusers AutoencoderKL (factor 4: three blocks) saved as a real folder; 48 latent channels are
    what sd3-tiny-editnet and ace-tiny take. Non-default factors, so that their use is visible."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=0.7, shift_factor=0.1)
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 synthetic pairs (masks, history chains) in 2 shards; shard 0 holds a row with an undecodable edited image
    and one whose width is not a multiple of the 8-pixel patch."""
    d = tmp_path_factory.mktemp("cache_corpus")
    shards = write_corpus(d, 24, shard_size=12, log=lambda m: None, seed=3, short_sides=(32, 48))
    rows = pq.read_table(shards[0]).to_pylist()
    rows[0]["edited_img"] = {"bytes": b"not an image", "path": "broken.png"}
    rows[1]["width"] -= 3
    write_shard(rows, shards[0])
    return d


def clean_corpus(folder: Path, n: int = 16) -> Path:
    write_corpus(folder, n, shard_size=8, log=lambda m: None, seed=4, short_sides=(32, 48))
    return folder


def read_unit(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_the_cache_holds_each_rows_vae_latents_with_the_configs_factors(vae, tmp_path):
    # every row kind: text-to-image (no src_img), controllable generation, reference-guided (a ref_img)
    rows = list(generate(6, seed=7, short_sides=(32,), multi_turn=0.5))
    rows += list(generate(1, seed=70, short_sides=(32,), tasks=("reference_guided",)))
    assert {"text_to_image", "controllable_generation", "reference_guided"} <= {r["task"] for r in rows}
    write_shard(rows, tmp_path / "part-00000.parquet")
    manifest = build_cache(CacheConfig([str(tmp_path / "part-00000.parquet")], str(vae), str(tmp_path / "c")), **QUIET)
    assert manifest["complete"] and manifest["totals"]["rows"] == 7
    codec = manifest["codec"]
    assert (codec["factor"], codec["latent_channels"], codec["scaling_factor"], codec["shift_factor"]) == (4, 48, 0.7, 0.1)
    tensors, meta = read_unit(tmp_path / "c" / "units" / "00000-00000.safetensors")
    stored = json.loads(meta["rows"])
    model = diffusers.AutoencoderKL.from_pretrained(vae).eval()
    masks = histories = images = 0
    for i, row in enumerate(rows):
        assert stored[i]["omni_edit_id"] == row["omni_edit_id"] and stored[i]["o_score"] == row["o_score"]
        for name in ("src_img", "ref_img"):  # no bytes kept, the path is; a null image stays null
            assert stored[i][name] == (None if row[name] is None else {"path": row[name]["path"]})
        w, h = row["width"], row["height"]
        for name in ("src_img", "edited_img", "ref_img"):
            if row[name] is None:
                assert f"{i}/{name}" not in tensors
                continue
            images += 1
            x = to_tensor(Image.open(io.BytesIO(row[name]["bytes"])))
            with torch.no_grad():  # diffusers directly: (mode - shift) * scale, from the folder's config
                want = (model.encode(x[None]).latent_dist.mode()[0] - 0.1) * 0.7
            got = tensors[f"{i}/{name}"]
            assert got.shape == (48, h // 4, w // 4) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if row["mask_img"] is not None:
            masks += 1
            m = tensors[f"{i}/mask_img"]
            assert m.shape == (h // 4, w // 4) and set(m.unique().tolist()) <= {0.0, 1.0}
        for k in range(len(row["history"] or [])):
            histories += 1
            assert tensors[f"{i}/history[{k}].image"].shape == (48, h // 4, w // 4)
    assert masks and histories  # both kinds were exercised
    assert len(tensors) == images + masks + histories  # and nothing else was stored


def test_batched_encoding_equals_the_codecs_one_image_encode(vae):
    codec = AutoencoderKLCodec(vae)
    x = torch.rand(3, 3, 16, 24) * 2 - 1
    got = encode_batch(codec, x)
    for i in range(3):
        torch.testing.assert_close(got[i], codec.encode(x[i]), atol=1e-5, rtol=1e-5)


def test_bad_rows_corrupt_images_and_bad_shards_are_skipped_counted_and_reported(corpus, vae, tmp_path):
    logs = []
    out = tmp_path / "c"
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    data = [str(corpus / "part-00000.parquet"), str(corpus / "part-00001.parquet"), str(tmp_path / "bad.parquet")]
    manifest = build_cache(CacheConfig(data, str(vae), str(out), decoder="pil"), log=logs.append)
    rows = [r for shard in ("part-00000", "part-00001") for r in pq.read_table(corpus / f"{shard}.parquet").to_pylist()]
    # source (none for text-to-image), target, reference, history; masks are not put through the VAE
    images = sum((r["src_img"] is not None) + 1 + (r["ref_img"] is not None) + len(r["history"] or []) for r in rows[2:])
    assert manifest["totals"] == {"rows": 22, "images": images, "bad_row": 1, "corrupt_image": 1, "bad_shard": 1}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["kind"]) for s in skipped] == [(str(tmp_path / "bad.parquet"), "bad_shard"),
                                                       (rows[1]["omni_edit_id"], "bad_row"),
                                                       (rows[0]["omni_edit_id"], "corrupt_image")]
    assert "not a readable Parquet file" in skipped[0]["reason"]
    assert "width" in skipped[1]["reason"] and "not a positive multiple of 8" in skipped[1]["reason"]
    assert skipped[2]["source"].endswith("part-00000.parquet") and skipped[2]["row_group"] == 0
    assert "edited_img" in skipped[2]["reason"]
    assert any("skipping a record (corrupt_image)" in m for m in logs) and any("bad_shard" in m for m in logs)
    assert any(m.startswith("cache: rank 0: unit 2/2 ") and "images/s" in m for m in logs)
    # the loader says what the cache left out, once
    logs.clear()
    EditLoader(DataConfig([str(out)], family="sd3"), text_encode, log=logs.append)
    assert [m for m in logs if "left out" in m] == [
        f"data: the latent cache {out} left out {{'bad_row': 1, 'corrupt_image': 1, 'bad_shard': 1}} when it was "
        f"encoded; each one is in {out / 'skipped.jsonl'}"]


def test_the_released_schema_caches_one_unit_per_row_group(vae, tmp_path):
    """OmniEdit-Filtered-1.2M's layout: the released columns only (no mask, no history), several row groups."""
    rows = [{k: r[k] for k in omniedit_schema(extras=False).names}
            for r in generate(10, seed=8, short_sides=(32,), tasks=OMNIEDIT_TASKS)]  # the release's seven tasks
    pq.write_table(pa.Table.from_pylist(rows, schema=omniedit_schema(extras=False)), tmp_path / "train-00000.parquet",
                   row_group_size=4)
    manifest = build_cache(CacheConfig([str(tmp_path / "train-00000.parquet")], str(vae), str(tmp_path / "c"),
                                       dtype="bf16"), **QUIET)
    assert [(u["file"], u["rows"]) for u in manifest["units"]] == [
        (f"units/00000-0000{g}.safetensors", n) for g, n in enumerate((4, 4, 2))]
    tensors, _ = read_unit(tmp_path / "c" / "units" / "00000-00002.safetensors")
    assert sorted(tensors) == ["0/edited_img", "0/src_img", "1/edited_img", "1/src_img"]
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def same_batches(x, y) -> None:
    """Every field of two packed batches equal, bit for bit (tokens with masks, text, pooled, metadata)."""
    assert x.ids == y.ids and x.tasks == y.tasks and torch.equal(x.weights, y.weights)
    for f in dataclasses.fields(x.packed):
        a, b = getattr(x.packed, f.name), getattr(y.packed, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name


@pytest.mark.parametrize("preset", ["ace-tiny", "sd3-tiny-editnet"])
def test_a_cache_yields_the_parquet_loaders_batches_and_resumes_exactly(preset, tmp_path):
    """Through the pixel codec and the preset's text encoder, a cache's batches are the Parquet loader's, bit
    for bit (masks, history, dropped prompts, ACE's indicators included): the same order, buckets and budget; a
    loader restored from a state continues exactly."""
    data = clean_corpus(tmp_path / "data")
    build_cache(CacheConfig([str(data)], "pixel", str(tmp_path / "c"), text_encoder=f"tiny:{preset}"), **QUIET)
    family = get_config(preset).family
    cfg = dict(token_budget=400, family=family, drop_prompt=0.3, seed=2)
    encoder = tiny_text_encoder(get_config(preset))
    sent = []
    parquet = EditLoader(DataConfig([str(data)], decoder="pil", **cfg), lambda t: sent.extend(t) or encoder.encode(t),
                         **QUIET)

    def refuse(texts):
        raise AssertionError(f"the cache holds the text states; {texts} were sent to the encoder")

    cached = EditLoader(DataConfig([str(tmp_path / "c")], **cfg), refuse, **QUIET)
    assert cached.decoder is None and cached.source.startswith(f"latent cache: {tmp_path / 'c'} (16 rows; pixel")
    a, b = iter(parquet), iter(cached)
    for _ in range(8):  # several epochs
        same_batches(next(a), next(b))
    assert "" in sent  # dropped prompts, and ACE's history turns behind their indicators, were compared too
    assert family == "sd3" or any(t.startswith("{image1} ") for t in sent), sent
    state = cached.state_dict()
    expected = [next(b) for _ in range(3)]
    restored = EditLoader(DataConfig([str(tmp_path / "c")], **cfg), refuse, **QUIET)
    restored.load_state_dict(state)
    for x, y in zip(expected, iter(restored)):
        same_batches(x, y)


def test_an_interrupted_cache_resumes_and_a_changed_one_is_refused(vae, tmp_path, monkeypatch):
    data = clean_corpus(tmp_path / "data")
    out = tmp_path / "c"
    cfg = CacheConfig([str(data)], str(vae), str(out))
    real, calls = cache_mod.write_unit, []

    def killed_at_the_second_unit(path, result):
        calls.append(path)
        if len(calls) == 2:
            (path.with_name(path.name + ".tmp")).write_bytes(b"half a file")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        real(path, result)

    monkeypatch.setattr(cache_mod, "write_unit", killed_at_the_second_unit)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, **QUIET)
    monkeypatch.setattr(cache_mod, "write_unit", real)
    first = out / "units" / "00000-00000.safetensors"
    written = first.stat().st_mtime_ns
    assert not (out / "units" / "00001-00000.safetensors").exists()
    # an unfinished cache is refused by the loader and the trainer's flag check, naming what to do
    for make in (lambda: EditLoader(DataConfig([str(out)]), text_encode, **QUIET),
                 lambda: TrainConfig(data=[str(out)], preset="sd3-tiny-editnet")):
        with pytest.raises(ValueError, match=r"incomplete \(1 of 2 units written\); rerun python -m omniace.train"):
            make()
    logs = []
    manifest = build_cache(cfg, log=logs.append)
    assert "cache: rank 0: 1 of its 2 units are written already" in logs
    assert first.stat().st_mtime_ns == written and manifest["complete"]
    assert not list((out / "units").glob("*.tmp"))
    fresh = build_cache(CacheConfig([str(data)], str(vae), str(tmp_path / "fresh")), **QUIET)
    assert fresh["totals"] == manifest["totals"]
    for u in manifest["units"]:
        (a, ma), (b, mb) = read_unit(out / u["file"]), read_unit(tmp_path / "fresh" / u["file"])
        assert ma == mb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same --out with other settings would mix two kinds of latents: refused, naming the fields
    with pytest.raises(ValueError, match=r"made differently: settings.patch_size \(cache 2, this run 1\), "
                                         r"settings.dtype \(cache 'fp32', this run 'bf16'\); use another --out"):
        build_cache(CacheConfig([str(data)], str(vae), str(out), dtype="bf16", patch_size=1), **QUIET)


def test_ranks_share_the_units(vae, tmp_path):
    """Unit i goes to rank i % world; rank 0 completes the cache once every rank's units are written."""
    data = clean_corpus(tmp_path / "data", n=24)  # 3 units
    cfg = CacheConfig([str(data)], str(vae), str(tmp_path / "c"))
    logs = {0: [], 1: []}
    assert build_cache(cfg, rank=1, world=2, log=logs[1].append) is None  # (ranks run one after the other here)
    assert sorted(p.name for p in (tmp_path / "c" / "units").iterdir()) == ["00001-00000.safetensors"]
    manifest = build_cache(cfg, rank=0, world=2, log=logs[0].append)
    assert manifest["complete"] and manifest["totals"]["rows"] == 24
    assert sum("cache: rank 0: unit" in m for m in logs[0]) == 2 and sum("cache: rank 1: unit" in m for m in logs[1]) == 1


def test_the_trainer_takes_a_preset_only_from_data_it_can_read(vae, corpus, tmp_path):
    build_cache(CacheConfig([str(corpus)], str(vae), str(tmp_path / "c")), **QUIET)
    c = str(tmp_path / "c")
    assert TrainConfig(data=[c], preset="sd3-tiny-editnet").preset == "sd3-tiny-editnet"
    with pytest.raises(ValueError, match=r"preset 'sd3-medium-editnet' takes 16-channel latents at factor 8; the "
                                         r"latent cache .* holds 48-channel latents at factor 4 \(AutoencoderKL "):
        TrainConfig(data=[c], preset="sd3-medium-editnet")
    with pytest.raises(ValueError, match=r"is a latent-space model \(codec factor 8, 16 channels\): .* encode the data "
                                         r"with its VAE first \(python -m omniace.train.cache"):
        TrainConfig(data=[str(corpus)], preset="sd3-medium-editnet")
    with pytest.raises(ValueError, match=r"--data mixes latent caches and Parquet data"):
        TrainConfig(data=[c, str(corpus)], preset="sd3-tiny-editnet")
    small = tiny_vae(tmp_path / "vae16", latent_channels=16)
    build_cache(CacheConfig([str(corpus)], str(small), str(tmp_path / "c16")), **QUIET)
    with pytest.raises(ValueError, match=r"encoded with different VAEs"):
        TrainConfig(data=[c, str(tmp_path / "c16")], preset="sd3-tiny-editnet")
    # cached text states must be what the preset reads: its family's instructions at its text width
    build_cache(CacheConfig([str(corpus)], str(vae), str(tmp_path / "t"), text_encoder="tiny:sd3-tiny-editnet"), **QUIET)
    assert TrainConfig(data=[str(tmp_path / "t")], preset="sd3-small-editnet").preset == "sd3-small-editnet"
    with pytest.raises(ValueError, match=r"preset 'ace-tiny' takes ace-family instructions of width 32 \(pooled None\); "
                                         r"the latent cache .* holds text states of tiny:sd3-tiny-editnet: sd3 family"):
        TrainConfig(data=[str(tmp_path / "t")], preset="ace-tiny")
    with pytest.raises(ValueError, match=r"encoded with different text encoders"):
        TrainConfig(data=[c, str(tmp_path / "t")], preset="sd3-tiny-editnet")



def test_cached_text_states_must_come_from_the_presets_own_tiny_encoder(tmp_path):
    """Byte- and word-level states have one width: a cache of ace-small's (bytes) used to train ace-edit (words),
    whose export then runs with the word encoder; refused by name, both ways, before any work."""
    data = clean_corpus(tmp_path / "data", n=4)
    for enc in ("ace-small", "ace-edit"):
        build_cache(CacheConfig([str(data)], "pixel", str(tmp_path / enc), text_encoder=f"tiny:{enc}"), **QUIET)
    for preset, cache, cached in (("ace-edit", "ace-small", "bytes"), ("ace-small", "ace-edit", "words"),
                                  ("ace-tiny", "ace-edit", "words")):
        own = get_config(preset).text_encoder
        with pytest.raises(ValueError, match=rf"preset '{preset}' reads instructions with its '{own}' text encoder; "
                                             rf"the latent cache .* holds text states of tiny:{cache} \('{cached}'\): "
                                             rf"cache them with --text-encoder tiny:{preset}"):
            TrainConfig(data=[str(tmp_path / cache)], preset=preset)
    assert TrainConfig(data=[str(tmp_path / "ace-edit")], preset="ace-edit").preset == "ace-edit"
    assert TrainConfig(data=[str(tmp_path / "ace-small")], preset="ace-tiny").preset == "ace-tiny"

def test_bad_arguments_stop_before_any_work(tmp_path, capsys):
    for args, message in (([], "--vae nope: not a diffusers AutoencoderKL folder (no config.json there)"),
                          (["--dtype", "int8"], "dtype 'int8'; expected one of ['bf16', 'fp16', 'fp32']"),
                          (["--max-aspect", "0.5"], "max_aspect 0.5"),
                          (["--text-encoder", "tiny:bogus"], "unknown preset 'bogus'"),
                          (["--text-encoder", "clip:x"], "text_encoder 'clip:x'; expected tiny:PRESET or t5:FOLDER")):
        with pytest.raises(SystemExit) as exit:
            cache_mod.main(["--data", str(tmp_path), "--vae", "nope" if not args else "pixel", "--out",
                            str(tmp_path / "c"), *args])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()
    (tmp_path / "f").write_text("x")  # a fresh user's --out naming a file (a raw FileExistsError, exit 1, before)
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(SystemExit) as exit:
            cache_mod.main(["--data", str(tmp_path), "--vae", "pixel", "--out", str(out)])
        assert exit.value.code == 2 and f"{tmp_path / 'f'} is a file; expected a cache folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"


# end to end (the test) -----------------------------------------------------------------------------
def torchrun(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, f"{cmd[5:]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def exact(run_dir: Path) -> list[dict]:
    keys = ("step", "loss", "lr", "grad_norm", "loss_per_task", "data")
    return [{k: r[k] for k in keys} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_latent_space_training_end_to_end(corpus, vae, tmp_path):
    from omniace.engine.model import build_model, load_model
    from omniace.engine.pipeline import EditPipeline, tiny_text_encoder

    cache = tmp_path / "cache"
    out = run(torchrun("omniace.train.cache", ["--data", str(corpus), "--vae", str(vae), "--out", str(cache),
                                               "--decoder", "pil", "--text-encoder", "tiny:sd3-tiny-editnet"]))
    assert "cache: rank 0: unit 1/1" in out.stdout and "cache: rank 1: unit 1/1" in out.stdout, out.stdout
    assert "cache: complete" in out.stdout and json.loads((cache / "cache.json").read_text())["totals"]["rows"] == 22
    # rerun with other settings: rank 0's refusal reaches rank 1 (no rank waits forever), one error line
    bad = subprocess.run(torchrun("omniace.train.cache", ["--data", str(corpus), "--vae", str(vae), "--out", str(cache),
                                                          "--dtype", "bf16"]), capture_output=True, text=True, env=ENV,
                         timeout=300)
    said = bad.stdout + bad.stderr
    assert bad.returncode != 0 and said.count("omniace-cache: error") == 1, said[-3000:]
    assert "settings.dtype (cache 'fp32', this run 'bf16')" in said

    args = ["--data", str(cache), "--preset", "sd3-tiny-editnet", "--steps", "6", "--ckpt-every", "2", "--log-every",
            "1", "--token-budget", "300", "--warmup", "1", "--lr", "3e-3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    out = run(torchrun("omniace.train.trainer", args + ["--out", str(whole)]))
    assert "latent cache:" in out.stdout and "AutoencoderKL" in out.stdout
    assert "left out {'bad_row': 1, 'corrupt_image': 1}" in out.stdout
    # SIGKILL the launcher's process group once the step-2 checkpoint is complete, then rerun: it resumes there
    proc = subprocess.Popen(torchrun("omniace.train.trainer", args + ["--out", str(killed)]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    for line in proc.stdout:
        if "checkpoint:" in line and "step_00000002" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    assert proc.wait(timeout=120) != 0 and not (killed / "model.safetensors").exists()
    resumed = run(torchrun("omniace.train.trainer", args + ["--out", str(killed)]))
    assert f"resumed from {killed / 'checkpoints' / 'step_00000002'}" in resumed.stdout
    assert exact(killed) == exact(whole) and len(exact(whole)) == 6
    assert (killed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()

    # the export, with the VAE its latents were cached with in vae/, loads through EditPipeline.from_pretrained
    # and edits an image: its weights, not the untrained ones, make the image
    (whole / "vae").symlink_to(vae, target_is_directory=True)
    pipe = EditPipeline.from_pretrained(whole)
    model = load_model(whole / "model.safetensors")
    codec, text = AutoencoderKLCodec(vae), tiny_text_encoder(model.cfg)
    src = Image.open(io.BytesIO(pq.read_table(corpus / "part-00001.parquet").to_pylist()[0]["src_img"]["bytes"]))
    edited = pipe.edit(src, "make it night", steps=2, seed=1)[0]
    assert edited.size == src.size
    assert edited.tobytes() == EditPipeline(model, text, codec).edit(src, "make it night", steps=2, seed=1)[0].tobytes()
    untrained = EditPipeline(build_model(model.cfg), text, codec).edit(src, "make it night", steps=2, seed=1)[0]
    assert edited.tobytes() != untrained.tobytes()
