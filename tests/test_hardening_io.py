"""Hardened inputs and outputs of the commands that use a checkpoint.

No command writes over one of its inputs or over a checkpoint, and its outputs are replaced
atomically; a bad output location, device or opset fails before the model is loaded; a file
that is no usable checkpoint (text, Git LFS pointer, web page, zip bomb, absurd metadata) is
refused with one line and exit status 2 by every command that reads checkpoints.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import crasmra.inference as inference
import crasmra.inference.loading as loading
from conftest import TINY_CONFIG, run_cli
from crasmra.checkpoint import CheckpointError, load_checkpoint_file
from crasmra.export import onnx_opset_range
from crasmra.inference import load_model
from test_inference import NUM_CLASSES, write_images

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 41234567\n"
)
WEB_PAGE = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("io-images"))


@pytest.fixture(scope="module")
def image(images: Path) -> Path:
    return sorted(images.rglob("*.png"))[0]


@pytest.fixture(scope="module")
def inference_ckpt(tiny_checkpoint: Path) -> dict[str, Any]:
    """The checkpoint reduced to what inference reads (small and quick to re-save)."""
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    return {"state_dict": ckpt["state_dict"], "crasmra": ckpt["crasmra"]}


@pytest.fixture
def checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint: a test that fails on old code may destroy it."""
    path = tmp_path / "ckpt" / "best.ckpt"
    path.parent.mkdir()
    shutil.copyfile(tiny_checkpoint, path)
    return path


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command loads the model: the refusal must come before."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(inference, "load_model", refuse)


def tampered(inference_ckpt: dict[str, Any], folder: Path, change: Callable[[dict], None],
             name: str = "tampered.ckpt") -> Path:
    """The inference checkpoint with ``change(metadata)`` applied, saved under ``folder``."""
    meta = {**inference_ckpt["crasmra"],
            "net_config": dict(inference_ckpt["crasmra"]["net_config"]),
            "transform": dict(inference_ckpt["crasmra"]["transform"])}
    change(meta)
    path = folder / name
    torch.save({"state_dict": inference_ckpt["state_dict"], "crasmra": meta}, path)
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("crasmra: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. outputs never replace inputs or checkpoints, and are replaced atomically
# ---------------------------------------------------------------------------------------------
def test_export_refuses_to_overwrite_its_own_checkpoint(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], no_model_load: None
) -> None:
    before = checkpoint.read_bytes()
    for fmt in ("onnx", "torchscript"):
        assert run_cli(["export", str(checkpoint), "--format", fmt, "--out", str(checkpoint)]) == 2
        assert "also an input of this command" in one_line_error(capsys)
    # another spelling of the same file, and a link to it
    other = checkpoint.parent / ".." / checkpoint.parent.name / checkpoint.name
    link = checkpoint.parent / "link.pt"
    link.symlink_to(checkpoint)
    for out in (other, link):
        assert run_cli(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 2
        one_line_error(capsys)
    assert checkpoint.read_bytes() == before


def test_export_replaces_only_its_own_earlier_export(checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, weights)
    args = ["export", str(checkpoint), "--format", "torchscript", "--out"]
    assert run_cli([*args, str(weights)]) == 2
    assert "never writes over one" in one_line_error(capsys)
    assert torch.load(weights, weights_only=True)["w"].shape == (3,)
    # An earlier TorchScript export is this command's own output: replacing it is the point.
    scripted = tmp_path / "model.pt"
    assert run_cli([*args, str(scripted)]) == 0
    assert run_cli([*args, str(scripted)]) == 0
    # Any other file with a checkpoint suffix is left alone, whatever it holds.
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint, but named like one")
    assert run_cli(["export", str(checkpoint), "--format", "onnx", "--out", str(notes)]) == 2
    one_line_error(capsys)
    assert notes.read_text().startswith("not a checkpoint")


def test_predict_refuses_to_overwrite_inputs_and_checkpoints(
    checkpoint: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_model_load: None,
) -> None:
    picture = tmp_path / "bird.png"
    shutil.copyfile(image, picture)
    last = checkpoint.parent / "last.ckpt"
    shutil.copyfile(checkpoint, last)
    originals = {p: p.read_bytes() for p in (picture, checkpoint, last)}
    cases = [
        (picture, "also an input"),            # an image given on the command line
        (checkpoint, "also an input"),         # the checkpoint itself
        (last, "never writes over one"),       # another checkpoint
    ]
    for out, message in cases:
        assert run_cli(["predict", str(checkpoint), str(picture), "-o", str(out)]) == 2
        assert message in one_line_error(capsys)
    # an image found in a folder argument is an input too
    assert run_cli(["predict", str(checkpoint), str(tmp_path), "-o", str(picture)]) == 2
    assert "also an input" in one_line_error(capsys)
    assert {p: p.read_bytes() for p in originals} == originals


def test_predict_output_is_replaced_atomically(checkpoint: Path, image: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "predictions.txt"
    out.write_text("an earlier run\n")
    reader = out.open()  # a reader of the old file keeps reading the old, whole file
    old_inode = out.stat().st_ino
    assert run_cli(["predict", str(checkpoint), str(image), "-o", str(out), "--quiet"]) == 0
    assert reader.read() == "an earlier run\n"
    reader.close()
    # os.replace put a new file in place; writing in place would have kept the inode
    assert out.stat().st_ino != old_inode
    assert out.read_text().startswith(str(image)) and "  1. " in out.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cam_refuses_to_overwrite_an_input_image(checkpoint: Path, image: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 no_model_load: None) -> None:
    # A second run over a folder that holds the first run's output: bird_cam.png would be
    # both an input and the output for bird.png.
    folder = tmp_path / "birds"
    folder.mkdir()
    shutil.copyfile(image, folder / "bird.png")
    shutil.copyfile(image, folder / "bird_cam.png")
    before = (folder / "bird_cam.png").read_bytes()
    assert run_cli(["cam", str(checkpoint), str(folder), "--out", str(folder)]) == 2
    assert "bird_cam.png is also an input" in one_line_error(capsys)
    assert (folder / "bird_cam.png").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 2. zip bombs
# ---------------------------------------------------------------------------------------------
def test_zip_bomb_is_refused_at_once(tmp_path: Path, image: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # 64 MiB of zeros deflate to about 64 KiB; torch stores checkpoints uncompressed, so a real
    # one never declares more than its own size. (The brief's 3 GiB one took 53 s and 4 GB.)
    bomb = tmp_path / "bomb.ckpt"
    info = zipfile.ZipInfo("archive/data.pkl")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(bomb, "w", compresslevel=1) as archive, archive.open(info, "w") as f:
        zeros = bytes(2**20)
        for _ in range(64):
            f.write(zeros)
    assert bomb.stat().st_size < 2**20
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_checkpoint_file(bomb)
    assert time.perf_counter() - start < 0.5
    assert run_cli(["predict", str(bomb), str(image)]) == 2
    assert "64 MiB uncompressed" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# 3. files that are no usable checkpoint: one line, exit 2, in every command
# ---------------------------------------------------------------------------------------------
def _command(name: str, ckpt: Path, image: Path, out: Path) -> list[str]:
    return {
        "predict": ["predict", str(ckpt), str(image)],
        "cam": ["cam", str(ckpt), str(image), "--out", str(out)],
        "report": ["report", str(ckpt), "--out", str(out), "--data", "synthetic"],
        "export": ["export", str(ckpt), "--format", "onnx", "--out", str(out / "m.onnx")],
        "serve": ["serve", str(ckpt), "--port", "0"],
    }[name]


BAD_FILES: dict[str, tuple[Callable[[dict], None] | str, str]] = {
    "five-bytes": ("hello", "is a text file, not a checkpoint"),
    "lfs-pointer": (LFS_POINTER, "Git LFS pointer"),
    "web-page": (WEB_PAGE, "a web page (HTML), not a checkpoint"),
    "format-abc": (lambda m: m.update(format_version="abc"), "format_version is 'abc'"),
    "head-hidden": (lambda m: m["net_config"].update(head_hidden=200_000),
                    "head_hidden is 200000"),
    "num-classes": (lambda m: m["net_config"].update(num_classes=50_000_000),
                    "num_classes is 50000000"),
    "num-classes-float": (lambda m: m["net_config"].update(num_classes=5e7),
                          "num_classes is 50000000.0"),
    "image-size": (lambda m: m["transform"].update(image_size=60_000), "image_size is 60000"),
}


@pytest.mark.parametrize("command", ["predict", "cam", "report", "export", "serve"])
@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_unusable_checkpoint_is_one_line_in_every_command(
    bad: str, command: str, inference_ckpt: dict[str, Any], image: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    content, message = BAD_FILES[bad]
    if isinstance(content, str):
        ckpt = tmp_path / "model.ckpt"
        ckpt.write_text(content)
    else:
        ckpt = tampered(inference_ckpt, tmp_path, content, "model.ckpt")
    code = run_cli(_command(command, ckpt, image, tmp_path / "out"))
    assert code == 2
    line = one_line_error(capsys)
    assert message in line, line
    assert "can run code" not in line and "does not say which dataset" not in line


@pytest.mark.parametrize(("args", "content", "message"), [
    (["validate", "--ckpt_path={ckpt}"], "hello", "is a text file, not a checkpoint"),
    (["test", "--ckpt_path={ckpt}"], WEB_PAGE, "a web page"),
    (["fit", "--model.runtime.init_from={ckpt}"], LFS_POINTER, "git lfs pull"),
    (["validate", "--ckpt_path={ckpt}"], lambda m: m.update(format_version="abc"),
     "format_version is 'abc'"),
    (["fit", "--model.runtime.init_from={ckpt}"],
     lambda m: m["net_config"].update(head_hidden=200_000),
     "head_hidden is 200000"),
])
def test_unusable_checkpoint_in_lightning_commands(
    args: list[str], content: Any, message: str, inference_ckpt: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if isinstance(content, str):
        ckpt = tmp_path / "model.ckpt"
        ckpt.write_text(content)
    else:
        ckpt = tampered(inference_ckpt, tmp_path, content, "model.ckpt")
    command = [args[0], f"--config={TINY_CONFIG}", f"--trainer.default_root_dir={tmp_path / 'r'}",
               *(a.format(ckpt=ckpt) for a in args[1:])]
    assert run_cli(command) == 2
    assert message in one_line_error(capsys)


def test_forgotten_checkpoint_argument_shows_the_usage(tmp_path: Path, image: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("todo: train a better model\n")
    assert run_cli(["predict", str(notes), str(image)]) == 2
    line = one_line_error(capsys)
    assert f"the first argument, {notes}, is a text file, not a checkpoint" in line.lower()
    assert "crasmra predict CHECKPOINT IMAGE..." in line
    assert "Unsupported operand" not in line
    # the image first, the checkpoint forgotten
    assert run_cli(["predict", str(image), str(image)]) == 2
    assert "is a PNG image, not a checkpoint" in one_line_error(capsys)


def test_report_names_the_real_problem(inference_ckpt: dict[str, Any], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # No --data and no run folder: it used to say the checkpoint names no dataset.
    ckpt = tampered(inference_ckpt, tmp_path, lambda m: m.update(format_version="abc"))
    assert run_cli(["report", str(ckpt), "--out", str(tmp_path / "r")]) == 2
    line = one_line_error(capsys)
    assert "damaged metadata" in line and "which dataset" not in line


def test_metadata_is_compared_with_the_weights_before_allocating(
    inference_ckpt: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Values within the limits but larger than the stored weights (up to 100k classes with
    # 16k-wide heads would pass the limits: tens of GB): the network is compared with the
    # weights on the meta device, before a real one is built. Modest sizes here, so that a
    # regression does not exhaust the test machine's memory.
    def change(meta: dict) -> None:
        meta["net_config"].update(head_hidden=2_048, num_classes=5_000)
        meta["classes"] = None

    ckpt = tampered(inference_ckpt, tmp_path, change)
    devices: list[str] = []
    real = loading.build_network

    def spy(*args: Any, **kwargs: Any) -> Any:
        devices.append(str(torch.get_default_device()))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "build_network", spy)
    with pytest.raises(CheckpointError, match="altered"):
        load_model(ckpt)
    assert devices == ["meta"]


# ---------------------------------------------------------------------------------------------
# 4. output locations that cannot be written, checked before the model is loaded
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["predict", "cam", "report", "export"])
def test_output_under_a_file_fails_before_loading(
    command: str, checkpoint: Path, image: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], no_model_load: None,
) -> None:
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub"
    args = {
        "predict": ["predict", str(checkpoint), str(image), "-o", str(out / "p.txt")],
        "cam": ["cam", str(checkpoint), str(image), "--out", str(out)],
        "report": ["report", str(checkpoint), "--out", str(out)],
        "export": ["export", str(checkpoint), "--format", "onnx", "--out", str(out / "m.onnx")],
    }[command]
    assert run_cli(args) == 2
    assert f"{blocker} is a file, not a folder" in one_line_error(capsys)


def test_report_out_that_is_a_file(checkpoint: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], no_model_load: None) -> None:
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    assert run_cli(["report", str(checkpoint), "--out", str(existing)]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert existing.read_text() == "keep me"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores file modes, so a read-only folder cannot be simulated")
@pytest.mark.parametrize("command", ["predict", "cam", "report", "export"])
def test_read_only_output_folder_fails_before_loading(
    command: str, checkpoint: Path, image: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], no_model_load: None,
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        args = {
            "predict": ["predict", str(checkpoint), str(image), "-o", str(locked / "p.txt")],
            "cam": ["cam", str(checkpoint), str(image), "--out", str(locked / "cam")],
            "report": ["report", str(checkpoint), "--out", str(locked)],
            "export": ["export", str(checkpoint), "--format", "onnx", "--out",
                       str(locked / "m.onnx")],
        }[command]
        assert run_cli(args) == 2
        assert "is not writable" in one_line_error(capsys)
    finally:
        locked.chmod(0o755)


def test_read_only_filesystem_fails_before_loading(
    checkpoint: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, no_model_load: None,
) -> None:
    # What a read-only mount answers, for every user (root included).
    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert run_cli(["report", str(checkpoint), "--out", str(tmp_path / "r")]) == 2
    line = one_line_error(capsys)
    assert f"{tmp_path} is not writable (Read-only file system)" in line


# ---------------------------------------------------------------------------------------------
# 5. devices and opsets
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu(checkpoint: Path, image: Path, capsys: pytest.CaptureFixture[str],
                            no_model_load: None) -> None:
    assert run_cli(["predict", str(checkpoint), str(image), "--device", "cuda"]) == 2
    line = one_line_error(capsys)
    assert "no CUDA device here" in line and "--device cpu" in line


def test_unsupported_onnx_opset(checkpoint: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str], no_model_load: None) -> None:
    low, high = onnx_opset_range()
    assert 7 <= low < 17 < high
    for opset in (1, high + 1):
        args = ["export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                "--opset", str(opset)]
        assert run_cli(args) == 2
        assert f"--opset {opset} is not supported" in one_line_error(capsys)
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------------------------
# 6. a report on the test split needs only test/
# ---------------------------------------------------------------------------------------------
def test_report_on_a_folder_with_only_test(tiny_checkpoint: Path, images: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "only-test"
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        shutil.copytree(folder, root / "test" / folder.name)
    out = tmp_path / "report"
    assert run_cli(["report", str(tiny_checkpoint), "--data", "folder", "--root", str(root),
                    "--split", "test", "--out", str(out), "--quiet"]) == 0
    assert f"folder/test: {NUM_CLASSES} images" in capsys.readouterr().out
    # the train split still needs train/
    assert run_cli(["report", str(tiny_checkpoint), "--data", "folder", "--root", str(root),
                    "--split", "train", "--out", str(out), "--quiet"]) == 2
    assert "no train/" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# 7. class names with control characters
# ---------------------------------------------------------------------------------------------
def test_class_names_cannot_split_the_table(inference_ckpt: dict[str, Any], image: Path,
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    names = ["plain", "two\nlines", "red \x1b[31mtext", "tab\there"]
    ckpt = tampered(inference_ckpt, tmp_path, lambda m: m.update(classes=names))
    assert run_cli(["predict", str(ckpt), str(image), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + NUM_CLASSES  # the path, then one line per class
    table = "\n".join(lines)
    assert "two\\nlines" in table and "red \\x1b[31mtext" in table and "tab\\there" in table
    assert "\x1b" not in table
