"""The package's structure: imports point down, and a new attention module is one class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from conftest import REPO, run_cli, tiny_fit_args
from crasmra.layers import register_attention

SRC = REPO / "src" / "crasmra"

#: The floors of the package, lowest first. A module may import from its own floor or below,
#: never from above. The package's ``__init__`` is a facade over all of them, outside the floors.
FLOORS: list[set[str]] = [
    # ground: no crasmra imports but these
    {"_version", "errors", "outputs", "cpu", "flags", "layers", "backbones", "data", "config",
     "runfolder", "lightning_private", "export_options",
     "metrics", "files", "file_kinds", "metric_names", "flag_moves"},
    # the network, its loss, its files
    {"model", "losses", "checkpoint"},
    # training and inference
    {"engine", "finetune", "callbacks", "inference", "export", "viz"},
    # running commands
    {"runner", "serve", "demo"},
    {"sweep"},
    # the command line
    {"cli", "commands"},
]


def _floor(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for index, floor in enumerate(FLOORS):
        if top in floor:
            return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The crasmra modules ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crasmra"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            # `from crasmra import serve` imports crasmra.serve, not the package facade.
            found |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("crasmra")}
    return found


def test_no_import_runs_back_up() -> None:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    upward = []
    for module, path in sorted(files.items()):
        if module == "crasmra":
            continue
        for imported in sorted(_imports(path, set(files)) - {module}):
            if imported == "crasmra":
                upward.append(f"{module} -> the package facade {imported}")
            elif _floor(imported) > _floor(module):
                upward.append(f"{module} (floor {_floor(module)}) -> {imported} "
                              f"(floor {_floor(imported)})")
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


# ---------------------------------------------------------------------------------------------
# a new attention module: one class and one registration
# ---------------------------------------------------------------------------------------------
@register_attention("toy-gain")
class ToyGainAttention(nn.Module):
    """Scales the stage output by a constant gain: ``x_e = proj(g x)``, ``x_s = g x``."""

    def __init__(self, in_channels: int, out_channels: int, gain: float = 1.0,
                 conv_layer: str = "light") -> None:
        super().__init__()
        self.gain = gain
        self.conv_layer_kind = conv_layer
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.gain * x
        return self.proj(y), y


def test_a_registered_attention_module_trains_through_the_command_line(tmp_path: Path) -> None:
    args = tiny_fit_args(tmp_path, "--model.net.variant=toy-gain",
                         "--model.net.attention_options={gain: 2.5}", "--test_after_fit=false")
    assert run_cli(args) == 0
    from crasmra.inference import load_model

    model = load_model(tmp_path / "checkpoints" / "best.ckpt")
    assert [type(m) for m in model.attention] == [ToyGainAttention] * 3
    # Its own option and the network's settings it names both reached it.
    assert {m.gain for m in model.attention} == {2.5}
    assert {m.conv_layer_kind for m in model.attention} == {"light"}
    assert model(torch.zeros(1, 3, 64, 64)).probs.shape == (1, 4)


def test_an_option_the_module_does_not_take_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = tiny_fit_args(tmp_path, "--model.net.variant=toy-gain",
                         "--model.net.attention_options={gian: 2.5}")
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert "takes no option(s) ['gian']" in err and "gain" in err


def test_the_channel_arguments_are_not_options() -> None:
    from crasmra.layers import create_attention

    for name in ("in_channels", "out_channels"):
        with pytest.raises(ValueError, match=rf"takes no option\(s\) \['{name}'\]"):
            create_attention("cram", 8, 4, options={name: 3})


def test_a_taken_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_attention("cram")
        class Other(nn.Module):
            pass


def test_each_network_default_is_written_once() -> None:
    """The engine's network options default to NetConfig's values, which the layers define."""
    import inspect

    from crasmra.engine import CRASMRAModule
    from crasmra.layers import DEFAULT_DELTA, DEFAULT_OMEGA, DEFAULT_REDUCTION
    from crasmra.model import NetConfig

    # The engine receives the network's part whole: its defaults are NetConfig's own.
    engine = inspect.signature(CRASMRAModule).parameters
    assert engine["net"].annotation in (NetConfig, "NetConfig")
    assert engine["net"].default == NetConfig()
    assert (NetConfig.omega, NetConfig.delta, NetConfig.reduction) == (
        DEFAULT_OMEGA, DEFAULT_DELTA, DEFAULT_REDUCTION)
    # The literal appears once in the sources of the package.
    sources = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    assert sources.count("DEFAULT_OMEGA = 0.5") == 1
    assert "omega: float = 0.5" not in sources


def test_the_engine_receives_typed_parts_and_every_old_flag_has_its_place() -> None:
    """Each part is a dataclass parameter of the engine; every flat flag that moved into them
    has its place in the part that holds a field of its name (new fields need no entry)."""
    import dataclasses
    import inspect
    import typing

    from crasmra.engine import CRASMRAModule
    from crasmra.flag_moves import MOVED_KEYS, PARTS

    hints = typing.get_type_hints(CRASMRAModule.__init__)
    fields = {}
    for part in PARTS:
        assert dataclasses.is_dataclass(hints[part]), part
        fields.update({f.name: part for f in dataclasses.fields(hints[part])})
    assert {name: fields.get(name) for name in MOVED_KEYS} == MOVED_KEYS
    parameters = set(inspect.signature(CRASMRAModule).parameters)
    assert parameters == {*PARTS, "classes", "transform_config"}
    source = (SRC / "engine" / "module.py").read_text()
    assert "locals()" not in source and "inspect.signature" not in source


def test_no_consumer_guesses_the_preprocessing(tiny_checkpoint: Path) -> None:
    """A loaded model carries a typed preprocessing config; nothing else writes ImageNet's
    normalisation or reads attributes that may be missing."""
    from crasmra.data import Preprocessing
    from crasmra.inference import load_model

    model = load_model(tiny_checkpoint)
    assert isinstance(model.preprocessing, Preprocessing)
    assert model.preprocessing.image_size == (64, 64)  # tests/configs/tiny.yaml
    assert model.resolved_preprocessing() is model.preprocessing
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if path.name != "transforms.py":
            assert "0.485" not in text, path
        assert 'getattr(model, "transform_config"' not in text, path
        assert 'getattr(net, "classes"' not in text, path


def test_an_installed_package_adds_an_attention_module_through_an_entry_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib.metadata import EntryPoint

    from crasmra.layers import registry
    from crasmra.model import create_model, variant_names

    group = registry.ENTRY_POINT_GROUP
    # A name crasmra already has is not loaded again, and a plugin that cannot be imported
    # does not stop the ones after it.
    declared = [
        EntryPoint("cram", "no_such_module:Cram", group),
        EntryPoint("broken-plugin", "no_such_module:Nothing", group),
        EntryPoint("toy-plugin", "test_architecture:ToyGainAttention", group),
    ]
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: declared if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "toy-plugin" in variant_names() and "broken-plugin" not in variant_names()
    assert registry.get_attention("cram").__name__ == "CRAM"
    net = create_model("resnet10t", 3, variant="toy-plugin", head_channels=8, head_hidden=8)
    assert all(isinstance(m, ToyGainAttention) for m in net.attention)


def test_a_registered_dataset_trains_through_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new dataset is one reader and one registration (``crasmra.data.register_dataset``)."""
    from crasmra.data import SyntheticFGVC, factory, register_dataset
    from crasmra.data.generic import load_folder

    monkeypatch.setattr(factory, "_DATASETS", dict(factory._DATASETS))
    root = tmp_path / "birds"
    counts = {"train": {"samples_per_class": 6}, "test": {"test_samples_per_class": 2}}
    for split, size in counts.items():
        images = SyntheticFGVC(split, num_classes=3, image_size=64, **size)
        for i in range(len(images)):
            image, label = images[i]
            folder = root / split / images.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    seen: dict[str, str] = {}

    def load_birds(root: Path, *, skip_bad_images: bool = False, level: str = "species"):
        seen["level"] = level
        return load_folder(root, skip_bad_images=skip_bad_images)

    register_dataset("birds", load_birds, options={"level"})
    args = tiny_fit_args(tmp_path / "run", "--data.dataset=birds", f"--data.root={root}",
                         "--data.options={level: genus}", "--test_after_fit=false")
    assert run_cli(args) == 0
    assert seen["level"] == "genus"
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("cub", load_birds)
