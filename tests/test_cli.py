"""The ``omniace`` CLI: user errors are one line on stderr with exit code 2; outputs are checked first."""
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from omniace.engine import weights
from omniace.engine.cli import main
from omniace.engine.pipeline import EditPipeline
from omniace.engine.weights import load_state_dict_file, save_safetensors

from helpers import demo_scene


def run(argv, capsys):
    """``main(argv)`` -> (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, message):
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "in.png"
    demo_scene(32, 32).save(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the CLI loads a model (the checks must come first)."""
    def fail(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(EditPipeline, "pretrained", fail)
    monkeypatch.setattr(EditPipeline, "tiny", fail)


@pytest.mark.parametrize("args, message", [
    (["edit", "--instruction", "x", "--size", "64"], "argument --size: size '64' is not WIDTHxHEIGHT"),  # unpacking
    (["edit", "--instruction", "x", "--size", "64x"], "size '64x' is not WIDTHxHEIGHT in positive integer pixels"),
    (["edit", "--instruction", "x", "--size", "0x64"], "size '0x64' is not WIDTHxHEIGHT"),
    (["edit", "--instruction", "x", "--steps", "0"], "argument --steps: steps must be an integer >= 1, got 0"),
    (["edit", "--instruction", "x", "--steps", "ten"], "steps must be an integer >= 1, got 'ten'"),
    (["edit", "--instruction", "x", "--guidance", "nan"], "argument --guidance: guidance must be a finite number, "
                                                          "got nan"),
    (["edit", "--instruction", "x", "--seed", "-1"], "seed must be an integer >= 0, got -1"),
    (["demo", "--per-task", "0"], "argument --per-task: per-task must be an integer >= 1, got 0"),
    (["info", "--resolution", "512x"], "resolution '512x' is not WIDTHxHEIGHT"),
    (["info", "--resolution", "big"], "resolution 'big' is neither a side nor WIDTHxHEIGHT"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys, no_model):
    code, _, err = run(args, capsys)
    assert_user_error(code, err, message)


@pytest.mark.parametrize("out, message", [
    ("result", "--out '{d}/result' has no image extension ''; expected a file name ending in one PIL can write, "
               "such as .png"),
    ("result.foo", "has the unknown image extension '.foo'"),
    ("result.xbm", "PIL cannot write an RGB image as XBM"),
    ("", "--out '{d}' is a folder; expected a file path such as '{d}/edited.png'"),
    ("in.png", "--out '{d}/in.png' is the input '{d}/in.png'; refusing to overwrite it without force (--force)"),
    ("in.png/o.png", "'{d}/in.png' is a file, not a folder"),
])
def test_out_is_checked_before_any_work(out, message, src, capsys, no_model):
    d = src.parent
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image} x", "--out", str(d / out)], capsys)
    assert_user_error(code, err, message.format(d=d))
    assert err.startswith(f"omniace: error: --out '{d}")


def test_out_folder_is_created_and_force_overwrites_the_input(src, capsys):
    out = src.parent / "missing" / "dir" / "o.png"
    code, stdout, _ = run(["edit", "--image", str(src), "--instruction", "{image} make it blue", "--steps", "1",
                           "--out", str(out)], capsys)
    assert code == 0 and f"created folder {out.parent}" in stdout and Image.open(out).size == (32, 32)
    before = src.read_bytes()
    code, _, _ = run(["edit", "--image", str(src), "--instruction", "{image} make it blue", "--steps", "1",
                      "--out", str(src), "--force"], capsys)
    assert code == 0 and src.read_bytes() != before


def test_size_takes_an_upper_case_x(tmp_path, capsys):
    out = tmp_path / "t2i.png"
    code, _, _ = run(["edit", "--instruction", "a red ball", "--size", "64X48", "--steps", "1", "--out", str(out)],
                     capsys)
    assert code == 0 and Image.open(out).size == (64, 48)


def test_edit_refusals_name_the_value(src, capsys, no_model):
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--size", "64x64"], capsys)
    assert_user_error(code, err, "--size 64x64 is for text-to-image; an edit keeps the size of its first --image")
    code, _, err = run(["edit", "--instruction", "x"], capsys)
    assert_user_error(code, err, "text-to-image (no --image) needs --size WIDTHxHEIGHT")
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--weights", "w.safetensors"], capsys)
    assert_user_error(code, err, "--weights 'w.safetensors' is not a file")
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--weights", str(src),
                        "--text-encoder", str(src.parent)], capsys)
    assert_user_error(code, err, "--text-encoder and --vae go together")
    (src.parent / "bad.png").write_bytes(b"not a png")
    code, _, err = run(["edit", "--image", str(src.parent / "bad.png"), "--instruction", "x"], capsys)
    assert_user_error(code, err, f"--image {src.parent / 'bad.png'}: cannot decode")


def test_mask_and_instruction_errors_write_nothing(tmp_path, capsys):
    demo_scene(64, 64).save(tmp_path / "in.png")
    Image.new("L", (16, 128), 255).save(tmp_path / "mask.png")
    out = tmp_path / "o.png"
    code, _, err = run(["edit", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                        "--instruction", "{image} x", "--out", str(out)], capsys)
    # the files given, not the pipeline's indices
    assert_user_error(code, err, f"--mask {tmp_path / 'mask.png'} (for --image {tmp_path / 'in.png'}) is 16x128 "
                                 f"but its image is 64x64")
    Image.new("L", (64, 64), 1).save(tmp_path / "mask01.png")  # a 0/1 PNG: edited the whole image, silently
    code, _, err = run(["edit", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask01.png"),
                        "--instruction", "{image} x", "--out", str(out)], capsys)
    assert_user_error(code, err, f"--mask {tmp_path / 'mask01.png'} (for --image {tmp_path / 'in.png'}) marks no pixel")
    # the default's word-level encoder keeps 63 words and EOS: 70 words + "tail" after {image} lose 9
    code, _, err = run(["edit", "--image", str(tmp_path / "in.png"), "--instruction", "{image} " + "y " * 70 + "tail",
                        "--no-truncate", "--out", str(out)], capsys)
    assert_user_error(code, err, "72 words; the word-level text encoder keeps 63: it would drop 'y y y y y y y y tail'")
    assert not out.exists()


def test_a_nan_model_writes_nothing(src, capsys, monkeypatch):
    def nan_pipeline(*a, **k):
        p = EditPipeline.tiny("ace")
        with torch.no_grad():
            p.model.final_layer.linear.bias.fill_(math.inf)
        return p
    monkeypatch.setattr(EditPipeline, "pretrained", nan_pipeline)
    out = src.parent / "o.png"
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image} x", "--steps", "2",
                        "--out", str(out)], capsys)
    assert_user_error(code, err, "DDIMSampler: the latent is not finite (NaN or inf) after step 1 of 2")
    assert not out.exists()


def test_debug_shows_the_traceback(src, no_model):
    with pytest.raises(ValueError, match="has no image extension"):
        main(["edit", "--image", str(src), "--instruction", "x", "--out", str(src.parent / "result"), "--debug"])


def test_info_and_demo_refusals(tmp_path, capsys):
    code, _, err = run(["info", "--preset", "ace-tiny", "--images", "12"], capsys)
    assert_user_error(code, err, "--images 12: an ACE request takes at most 9 condition images")
    code, out, _ = run(["info", "--preset", "ace-tiny", "--resolution", "64X32", "--images", "0"], capsys)
    assert code == 0 and "64x32 with 0 condition image(s): 32 image tokens" in out
    (tmp_path / "file").write_text("x")
    code, _, err = run(["demo", "--out", str(tmp_path / "file")], capsys)
    assert_user_error(code, err, f"--out '{tmp_path / 'file'}' is a file; expected a folder")
    # a folder under a file: refused before any edit (it used to fail only after all 60, naming no flag)
    code, out, err = run(["demo", "--out", str(tmp_path / "file" / "sub")], capsys)
    assert_user_error(code, err, f"--out '{tmp_path / 'file' / 'sub'}': cannot make the folder (Not a directory)")
    assert "omniace demo:" not in out  # no edit ran
    # a step count the default's sampler refuses: refused before --out is made (no empty folder left behind)
    code, out, err = run(["demo", "--steps", "300", "--out", str(tmp_path / "never")], capsys)
    assert_user_error(code, err, "steps=300 repeats training steps (299 distinct of 1000); use at most 271 steps")
    assert not (tmp_path / "never").exists() and "omniace demo:" not in out


def test_a_trainer_folder_samples_as_its_model_file_does(tmp_path):
    """``--weights folder`` and ``--weights folder/model.safetensors`` of a tiny pixel export: the same guidance
    and timestep spacing (the folder loader used to fall back to ACE's 4.5 and trailing)."""
    import shutil

    from omniace.engine.pipeline import DEFAULT_WEIGHTS, EditPipeline

    (tmp_path / "run").mkdir()
    shutil.copy(DEFAULT_WEIGHTS, tmp_path / "run" / "model.safetensors")
    by_file = EditPipeline.pretrained(tmp_path / "run" / "model.safetensors")
    by_folder = EditPipeline.from_pretrained(tmp_path / "run")
    for p in (by_file, by_folder):
        assert (p.default_guidance, p.timestep_spacing) == (1.0, "sigma")


def test_convert_checks_its_paths_and_files(tmp_path, capsys):
    sd = {"a": torch.randn(3, 2)}
    sd["b"] = sd["a"]  # tied: safetensors alone refuses "Some tensors share memory"
    torch.save(sd, tmp_path / "tied.pth")
    code, out, _ = run(["convert", str(tmp_path / "tied.pth"), str(tmp_path / "tied.safetensors"),
                        "--family", "none"], capsys)
    back = load_state_dict_file(tmp_path / "tied.safetensors")
    assert code == 0 and "wrote 2 tensors" in out and back["b"] is back["a"] and torch.equal(back["a"], sd["a"])
    code, _, err = run(["convert", str(tmp_path / "tied.pth"), str(tmp_path / "out.pth")], capsys)
    assert_user_error(code, err, f"destination '{tmp_path / 'out.pth'}' must end in .safetensors")
    st = tmp_path / "tied.safetensors"
    code, _, err = run(["convert", str(st), str(st), "--family", "none"], capsys)
    assert_user_error(code, err, "is the input")
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:40])
    code, _, err = run(["convert", str(tmp_path / "cut.safetensors"), str(tmp_path / "x.safetensors")], capsys)
    assert_user_error(code, err, f"{tmp_path / 'cut.safetensors'}: not a readable checkpoint")
    code, _, err = run(["convert", str(tmp_path / "none.pth"), str(tmp_path / "x.safetensors")], capsys)
    assert_user_error(code, err, f"checkpoint '{tmp_path / 'none.pth'}' does not exist")
    with pytest.raises(SystemExit) as exit:  # python -m omniace.engine.weights is the same command
        weights.main([str(tmp_path / "cut.safetensors"), str(tmp_path / "x.safetensors")])
    assert exit.value.code == 2 and not (tmp_path / "x.safetensors").exists()


def test_convert_output_is_world_readable(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
        code, _, _ = run(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                          "--family", "none"], capsys)
    finally:
        os.umask(old)
    assert code == 0 and os.stat(tmp_path / "b.safetensors").st_mode & 0o777 == 0o644


def test_the_console_script_prints_no_traceback(tmp_path):
    demo_scene(32, 32).save(tmp_path / "in.png")
    proc = subprocess.run([sys.executable, "-m", "omniace.engine.cli", "edit", "--image", str(tmp_path / "in.png"),
                           "--instruction", "x", "--out", str(tmp_path / "result")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"omniace: error: --out '{tmp_path / 'result'}' has no image extension ''; expected a " \
                          f"file name ending in one PIL can write, such as .png, .jpg, .webp, .bmp, .tiff\n"


# from a fresh user's run ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["edit", "--instruction", "x", "--steps", "0"], "argument --steps: steps must be an integer >= 1, got 0"),
    (["edit", "--instruction", "x", "--guidance", "-inf"], "guidance must be a finite number, got -inf"),
    (["edit", "--instruction", "x", "--size", "-64x64"], "size '-64x64' is not WIDTHxHEIGHT"),
    (["serve", "--port", "99999"], "port must be an integer in [1, 65535], got 99999"),
    (["serve", "--ray", "--replicas", "3", "--max-replicas", "2"], "--max-replicas 2 is below --replicas 3"),
])
def test_argument_errors_are_exactly_one_line(args, message, capsys):
    code, _, err = run(args, capsys)
    assert code == 2 and err.strip().count("\n") == 0 and message in err, err


def test_huge_sizes_are_one_line_errors_before_any_work(capsys, src, tmp_path):
    code, _, err = run(["edit", "--instruction", "x", "--steps", "1", "--size", "99999992x99999992",
                        "--out", str(tmp_path / "o.png")], capsys)
    assert_user_error(code, err, "over the pipeline's max_tokens of 16384")
    big = tmp_path / "big.png"
    Image.new("RGB", (4000, 4000)).save(big)
    code, _, err = run(["edit", "--image", str(big), "--instruction", "{image} x", "--steps", "1",
                        "--out", str(tmp_path / "o.png"), "--resize", "error"], capsys)
    assert_user_error(code, err, "needs 500000 image tokens per sample")


def test_a_failed_edit_leaves_no_folder_behind(capsys, src, tmp_path):
    out = tmp_path / "new" / "deeper" / "o.png"
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image3} x", "--out", str(out)], capsys)
    assert_user_error(code, err, "instruction names {image3} but the request has 1 image(s); {image} is the first")
    assert "sample 0" not in err  # the packer's batch coordinates mean nothing to a CLI user
    assert not (tmp_path / "new").exists()


def test_edit_with_a_trainer_export(capsys, src, tmp_path):
    from omniace.engine.pipeline import DEFAULT_WEIGHTS

    out = tmp_path / "o.png"
    code, stdout, err = run(["edit", "--image", str(src), "--instruction", "{image} make it blue", "--steps", "2",
                             "--weights", str(DEFAULT_WEIGHTS), "--out", str(out)], capsys)
    assert code == 0, err
    ref = EditPipeline.pretrained().edit(demo_scene(32, 32), "{image} make it blue", steps=2)[0]
    assert Image.open(out).tobytes() == ref.tobytes()  # the same default guidance (1.0) as the Python API


@pytest.mark.parametrize("mode", ["resize", "crop"])
def test_edit_takes_any_size(mode, tmp_path, capsys):
    demo_scene(37, 53).save(tmp_path / "in.png")
    Image.new("L", (37, 53), 255).save(tmp_path / "m.png")
    out = tmp_path / "o.png"
    code, _, err = run(["edit", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"),
                        "--instruction", "{image} make it blue", "--steps", "2", "--resize", mode, "--out", str(out)],
                       capsys)
    assert code == 0, err
    ref = EditPipeline.pretrained().edit(demo_scene(37, 53), "{image} make it blue",
                                         masks=Image.new("L", (37, 53), 255), steps=2, resize=mode)[0]
    assert Image.open(out).size == (37, 53) and Image.open(out).tobytes() == ref.tobytes()


def test_edit_resize_error_keeps_the_strict_message(tmp_path, capsys, no_model):
    Image.new("RGB", (1, 300)).save(tmp_path / "thin.png")
    code, _, err = run(["edit", "--image", str(tmp_path / "thin.png"), "--instruction", "x", "--out",
                        str(tmp_path / "o.png")], capsys)
    assert_user_error(code, err, f"--image {tmp_path / 'thin.png'}: image size 1x300 is too small for the model")
    code, _, err = run(["edit", "--image", str(tmp_path / "thin.png"), "--instruction", "x", "--resize", "fit"],
                       capsys)
    assert_user_error(code, err, "argument --resize: invalid choice: 'fit'")


# item 5: the CLI runs what the Python API runs ---------------------------------------------------------------

def test_an_untrained_model_needs_an_explicit_flag(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.png"
    monkeypatch.setattr(EditPipeline, "tiny", lambda *a, **k: pytest.fail("loaded before refusing"))
    code, _, err = run(["edit", "--family", "sd3", "--instruction", "x", "--size", "64x64", "--out", str(out)],
                       capsys)
    assert_user_error(code, err, "--family sd3 without --weights is an untrained tiny EditNet: its output is noise; "
                                 "pass --weights")
    assert not out.exists()
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"sampling an untrained tiny SD3 EditNet \(--allow-untrained\): the "
                                         r"output is noise"):
        code, stdout, err = run(["edit", "--family", "sd3", "--allow-untrained", "--instruction", "x", "--size",
                                 "40x24", "--steps", "1", "--out", str(out)], capsys)
    assert code == 0 and "wrote" in stdout, err
    assert Image.open(out).size == (40, 24)


def test_a_request_over_the_memory_limit_is_refused_before_loading(src, tmp_path, capsys, monkeypatch, no_model):
    out = tmp_path / "o.png"
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image} x", "--max-memory", "0.001",
                        "--out", str(out)], capsys)
    assert_user_error(code, err, "this request needs an estimated ")
    from omniace.engine import memory
    from omniace.engine.model import build_model, count_parameters

    weights = memory.human(count_parameters(build_model("ace-edit")) * 4)  # the embedded default, fp32
    assert f"(weights {weights}, activations" in err and "more than the 1.0 MiB allowed by --max-memory" in err
    monkeypatch.setattr(memory, "available_memory", lambda device: 5 << 20)  # a tiny fake free memory
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image} x", "--out", str(out)], capsys)
    assert_user_error(code, err, "more than the 5.0 MiB free on cpu; use smaller images")
    assert not out.exists()
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--max-memory", "0"], capsys)
    assert_user_error(code, err, "argument --max-memory: max-memory must be a positive number, got '0'")


def test_memory_is_checked_after_loading_a_pipeline_folder(src, tmp_path, capsys, monkeypatch):
    calls = []

    def from_pretrained(path, device, dtype, preset):
        calls.append((path, device, dtype, preset))
        return EditPipeline.pretrained(device=device, dtype=dtype)
    monkeypatch.setattr(EditPipeline, "from_pretrained", from_pretrained, raising=False)
    out = tmp_path / "o.png"
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image} make it blue", "--steps", "2",
                        "--weights", str(tmp_path), "--out", str(out)], capsys)
    assert code == 0, err
    assert calls == [(str(tmp_path), "cpu", torch.float32, None)]
    ref = EditPipeline.pretrained().edit(demo_scene(32, 32), "{image} make it blue", steps=2)[0]
    assert Image.open(out).tobytes() == ref.tobytes()
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image} x", "--weights", str(tmp_path),
                        "--max-memory", "0.0001", "--out", str(tmp_path / "p.png")], capsys)
    assert_user_error(code, err, "(weights 0.0 MiB, activations")  # resident once loaded: counted 0
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image} x", "--weights", str(tmp_path),
                        "--vae", "v", "--text-encoder", "t"], capsys)
    assert_user_error(code, err, "is a pipeline folder: it holds its own text encoder and VAE")


def test_a_folder_that_is_no_pipeline_is_named(src, tmp_path, capsys, no_model):
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--weights", str(tmp_path)], capsys)
    assert_user_error(code, err, f"'{tmp_path}' lacks text_encoder/, vae/; expected an ACE folder")
    (tmp_path / "empty").touch()  # a fresh user's empty file was told to pass --preset, which then failed
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--weights", str(tmp_path / "empty")],
                       capsys)
    assert_user_error(code, err, "is an empty file, not a checkpoint")


def test_device_dtype_and_latent_exports(src, tmp_path, capsys):
    from omniace.engine.model import build_model, save_model

    out = tmp_path / "o.png"
    code, _, err = run(["edit", "--image", str(src), "--instruction", "{image} x", "--steps", "2", "--dtype",
                        "bfloat16", "--out", str(out)], capsys)
    assert code == 0, err
    ref = EditPipeline.pretrained(dtype=torch.bfloat16).edit(demo_scene(32, 32), "{image} x", steps=2)[0]
    fp32 = EditPipeline.pretrained().edit(demo_scene(32, 32), "{image} x", steps=2)[0]
    assert Image.open(out).tobytes() == ref.tobytes() != fp32.tobytes()
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--device", "cuda:99"], capsys)
    assert_user_error(code, err, "device 'cuda:99' is not usable here")
    save_model(build_model("sd3-tiny-editnet"), tmp_path / "sd3.safetensors")  # a pixel-space SD3 export
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--steps", "1", "--weights",
                        str(tmp_path / "sd3.safetensors"), "--out", str(out)], capsys)
    assert code == 0 and Image.open(out).size == (32, 32), err
    with torch.device("meta"):
        big = build_model("ace-0.6b-512")
    torch.save({}, tmp_path / "empty.pth")
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--weights", str(tmp_path / "empty.pth")],
                       capsys)
    assert_user_error(code, err, "is not a .safetensors trainer export, so it carries no config; pass --preset to "
                                 "name its config")
    code, _, err = run(["edit", "--image", str(src), "--instruction", "x", "--weights", str(tmp_path / "empty.pth"),
                        "--preset", "ace-0.6b-512"], capsys)
    assert_user_error(code, err, "is a latent-space ace model (codec factor 8); give --text-encoder and --vae")
    del big


def test_edit_a_latent_model_with_t5_and_a_vae(src, tmp_path, capsys):
    """--weights with --text-encoder and --vae: real transformers T5 and diffusers AutoencoderKL folders (tiny,
    random), an odd-size image, --dtype, and the memory check once they are loaded."""
    tokenizers = pytest.importorskip("tokenizers")
    diffusers = pytest.importorskip("diffusers")
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from omniace.engine.config import get_config
    from omniace.engine.model import build_model, save_model

    words = ["<pad>", "</s>", "<unk>", "make", "it", "blue"]
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "t5")
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(tmp_path / "t5")
    diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                            norm_num_groups=8, layers_per_block=1).save_pretrained(tmp_path / "vae")
    cfg = get_config("ace-tiny", in_channels=4, y_channels=16, text_len=120, codec_factor=2)
    save_model(build_model(cfg), tmp_path / "m.safetensors")
    Image.new("RGB", (37, 53), (30, 90, 200)).save(tmp_path / "odd.png")
    args = ["edit", "--image", str(tmp_path / "odd.png"), "--instruction", "{image} make it blue", "--steps", "1",
            "--weights", str(tmp_path / "m.safetensors"), "--text-encoder", str(tmp_path / "t5"), "--vae",
            str(tmp_path / "vae"), "--dtype", "float32"]
    code, _, err = run(args + ["--out", str(tmp_path / "o.png")], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (37, 53)
    code, _, err = run(args + ["--max-memory", "0.0001", "--out", str(tmp_path / "p.png")], capsys)
    assert_user_error(code, err, "(weights 0.0 MiB, activations")  # loaded first: its weights are resident
    assert not (tmp_path / "p.png").exists()


def test_eval_cli_refuses_a_non_finite_guidance_in_one_line(capsys):
    from omniace.train.eval import main as eval_main

    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--weights", "unused.safetensors", "--guidance", "nan"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --guidance: guidance must be a finite number, got nan" in err and "Traceback" not in err
