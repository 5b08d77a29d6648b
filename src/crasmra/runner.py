"""Running ``fit``, ``validate`` and ``test``: crasmra's LightningCLI and its run-folder rules.

:func:`run_lightning` is the one entry point of the three commands, for the command line,
the demo and sweeps alike; :func:`make_cli_class` builds the LightningCLI subclass that holds
the checks made before a run starts (writable folder, earlier runs, checkpoints, CPU threads).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crasmra.config import config_files, expand_config_args
from crasmra.errors import UsageError
from crasmra.flag_moves import nest_flat_hparams, refuse_moved_flags
from crasmra.flags import check_class_paths, lightning_parser_class
from crasmra.runfolder import (
    check_free_space,
    clear_earlier_run,
    create_run_folder,
    default_loggers,
    refuse_earlier_run,
)

__all__ = ["describe_model", "make_cli_class", "run_lightning", "with_atomic_checkpoint_io"]

log = logging.getLogger("crasmra")


def _plain_image_size(size: Any) -> int | list[int] | None:
    """``--data.image_size`` as NetConfig.img_size takes it: an int or ``[h, w]``."""
    return size if size is None or isinstance(size, int) else [int(s) for s in size]


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """``plugins`` plus :class:`~crasmra.callbacks.AtomicCheckpointIO` if none is a CheckpointIO."""
    from lightning.fabric.plugins import CheckpointIO

    from crasmra.callbacks import AtomicCheckpointIO

    if plugins is None:
        plugins = []
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def make_cli_class() -> type:
    """The LightningCLI subclass of ``crasmra fit``, ``validate`` and ``test``."""
    # Lightning is imported here, not at module import, so `crasmra --help` stays instant.
    import torch
    from lightning.pytorch.cli import LightningArgumentParser

    from crasmra.callbacks import (
        MetricsFileCallback,
        ResumableCheckpoint,
        RunInfoCallback,
        SeededLoaderWorkers,
        keep_final_epoch_without_validation,
    )
    from crasmra.checkpoint import (
        CheckpointError,
        check_data_settings,
        load_checkpoint_file,
        network_hparams,
    )
    from crasmra.cpu import configure_cpu, plan_compute, runs_on_cpu
    from crasmra.cpu import log as cpu_log
    from crasmra.engine import RNGStateCallback
    from crasmra.files import check_output
    from crasmra.lightning_private import CheckpointHparamsHook, subcommand_parser
    from crasmra.metric_names import MONITOR

    class CRASMRACLI(CheckpointHparamsHook):
        """LightningCLI with crasmra's run-folder layout, links and input checks."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # No flag abbreviations, and one-line errors (see crasmra.flags).
            kwargs.setdefault("parser_class", lightning_parser_class())
            self._start_global_step: int | None = None
            # Tensor shapes and path of the checkpoint the run starts from (--ckpt_path).
            self._start_shapes: dict[str, tuple[int, ...]] | None = None
            self._start_path: str | None = None
            self._start_classes: int | None = None
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            # A ModelCheckpoint whose last.ckpt follows every epoch (see ResumableCheckpoint).
            parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": MONITOR,
                    "checkpoint.mode": "max",
                    "checkpoint.filename": "best",
                    "checkpoint.save_last": True,
                    "checkpoint.auto_insert_metric_name": False,
                }
            )
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="After `fit`, evaluate best.ckpt on the test split: the best epoch by "
                "validation, or the final epoch when there is no validation split.",
            )
            parser.add_argument(
                "--threads",
                type=int | None,
                default=None,
                help="Intra-op CPU threads when training or evaluating on the CPU (default: "
                "chosen from the usable cores together with --data.num_workers so that they do "
                "not oversubscribe them; see BENCHMARKS.md).",
            )
            parser.add_argument(
                "--overwrite",
                type=bool,
                default=False,
                help="Let `fit` start afresh in a run folder that holds an earlier run's "
                "checkpoints or metrics (they are replaced). Without it such a folder is refused.",
            )
            parser.link_arguments("model.net.backbone", "data.backbone", apply_on="parse")
            # A Transformer that timm builds for one input size is built for the crop size.
            parser.link_arguments("data.image_size", "model.net.img_size", apply_on="parse",
                                  compute_fn=_plain_image_size)
            parser.link_arguments("data.num_classes", "model.net.num_classes",
                                  apply_on="instantiate")
            parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")
            parser.link_arguments(
                "data.transform_config", "model.transform_config", apply_on="instantiate"
            )

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand]
            self._plan_cpu(config)
            root = Path(config.trainer.default_root_dir or "runs/crasmra")
            ckpt_path = config.get("ckpt_path")
            if self.subcommand == "fit":
                create_run_folder(root)
                if ckpt_path is None and not config.get("overwrite", False):
                    refuse_earlier_run(root)
            if ckpt_path not in (None, "last", "best", "hpc") and not Path(ckpt_path).is_file():
                raise UsageError(f"--ckpt_path {ckpt_path} does not exist.")
            if ckpt_path == "last" and self.subcommand == "fit":
                last = root / "checkpoints" / "last.ckpt"
                if not last.is_file():
                    raise UsageError(
                        f"--ckpt_path last: no checkpoint at {last}. Resume with the same "
                        "--trainer.default_root_dir (or --config) as the interrupted run."
                    )
                self._read_start_checkpoint(last)
            self._check_outputs(config, root)
            if self._start_shapes is not None and self._start_classes is not None:
                # Before anything is allocated: the network the options describe must be the
                # one whose weights the file holds. The class count comes from the data when
                # the classes are instantiated; until then, the checkpoint's own stands in (a
                # dataset of another class count is explained when the checkpoint is loaded).
                self._check_against_checkpoint(
                    self._skeleton(config, num_classes=self._start_classes), "the options")
            init_from = config.model.runtime.get("init_from")
            if init_from:
                # Before the data module is built: a bad file must fail before any other work.
                load_checkpoint_file(init_from)
            pretrained = config.model.net.get("pretrained")
            if isinstance(pretrained, str) and Path(pretrained).is_file():
                # Read once here for the checks the backbone loader lacks: torch.load does not
                # verify the zip checksums (flipped bytes would load as wrong weights), and a
                # refused pickle gets a one-line reason instead of PyTorch's advice to retry
                # with weights_only=False.
                load_checkpoint_file(pretrained)

        def _plan_cpu(self, config: Any) -> None:
            # Threads and loader workers are chosen together, before the data module starts
            # any worker (see crasmra.cpu). The choice is logged once the input has passed
            # every check (_announce_cpu), so that a bad input still gets a one-line error.
            accelerator = config.trainer.get("accelerator") or "auto"
            device = accelerator if accelerator in ("cpu", "auto") else "cuda"
            plan = configure_cpu(
                device, config.data.num_workers, config.get("threads"), announce=False
            )
            config.data.num_workers = plan.workers
            # Announced where crasmra chose or was told the threads, not on an accelerator.
            chosen = runs_on_cpu(device) or plan.source != "auto"
            self._cpu_plan = plan if chosen else None
            self._compute_line = None
            if runs_on_cpu(device):
                # Memory format and precision per backbone and CPU (crasmra.cpu.plan_compute);
                # a precision or channels_last set in the config or on the command line wins.
                compute = plan_compute(str(config.model.net.backbone))
                if config.trainer.get("precision") is None:
                    config.trainer.precision = compute.precision
                channels_last = config.model.runtime.get("channels_last")
                self._compute_line = compute.describe(
                    compute.channels_last if channels_last is None else bool(channels_last),
                    config.trainer.precision,
                )

        def _announce_cpu(self) -> None:
            plan = getattr(self, "_cpu_plan", None)
            if plan is not None:
                cpu_log.info(plan.describe())
            line = getattr(self, "_compute_line", None)
            if line is not None:
                cpu_log.info(line)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            trainer_config = self._get(self.config_init, "trainer", default={})
            root = trainer_config.get("default_root_dir") or "runs/crasmra"
            if trainer_config.get("logger") in (None, True):
                # validate/test log into their own subfolder so that they never replace the
                # training run's metrics.csv, config.yaml or TensorBoard events.
                log_root = Path(root) if self.subcommand == "fit" else Path(root) / self.subcommand
                resuming = self.subcommand == "fit" and self.config.fit.get("ckpt_path")
                # An evaluation appends its rows: a later (even a failing) one never deletes
                # what an earlier one wrote.
                kwargs["logger"] = default_loggers(
                    log_root,
                    append=bool(resuming) or self.subcommand != "fit",
                    resume_step=self._start_global_step if resuming else None,
                )
            kwargs["default_root_dir"] = root
            kwargs["plugins"] = with_atomic_checkpoint_io(trainer_config.get("plugins"))
            return super().instantiate_trainer(**kwargs)

        def _read_start_checkpoint(self, path: str | Path) -> dict[str, Any]:
            # The checkpoint a run starts from is read once, here, for its checks; its global
            # step is kept for the loggers (see default_loggers' resume_step), and its tensors'
            # shapes for the comparison with the network before anything is built.
            checkpoint = load_checkpoint_file(path)
            step = checkpoint.get("global_step")
            self._start_global_step = step if isinstance(step, int) else None
            state = checkpoint.get("state_dict")
            if isinstance(state, dict):
                self._start_shapes = {k: tuple(v.shape) for k, v in state.items()
                                      if isinstance(v, torch.Tensor)}
                self._start_path = str(path)
            classes = network_hparams(checkpoint.get("hyper_parameters")).get("num_classes")
            self._start_classes = classes if isinstance(classes, int) else None
            return checkpoint

        def _check_outputs(self, config: Any, root: Path) -> None:
            # The files this command writes into the run folder (config.yaml, classes.txt,
            # run_info.json, metrics) must not be one of its inputs (e.g. --config
            # ROOT/config.yaml) nor a checkpoint, a copy or a link: refused before any work.
            folder = root if self.subcommand == "fit" else root / self.subcommand
            inputs = [*self.input_files, *(
                p for p in (config.get("ckpt_path"), config.model.runtime.get("init_from"),
                            config.model.net.get("pretrained"))
                if isinstance(p, str) and Path(p).is_file())]
            names = ["config.yaml", "metrics.csv", "metrics.json"]
            if self.subcommand == "fit":
                names += ["classes.txt", "run_info.json"]
            for name in names:
                check_output(folder / name, "--trainer.default_root_dir", inputs=inputs)

        def _skeleton(self, model: Any, num_classes: int | None = None) -> Any:
            """The training module with ``model``'s arguments (a config's ``model`` section or
            a checkpoint's hyperparameters, in either layout) on the meta device: its shapes,
            without memory. ``num_classes``, when given, replaces the class count and names."""
            from crasmra.engine import CRASMRAModule

            if hasattr(model, "model"):
                model = model.model
            hparams = nest_flat_hparams(model.as_dict() if hasattr(model, "as_dict")
                                        else dict(model))
            # Files and compilation play no part here.
            hparams["net"] = {**(hparams.get("net") or {}), "pretrained": False}
            hparams["runtime"] = {**(hparams.get("runtime") or {}), "init_from": None,
                                  "reinit_heads": False, "compile": False}
            if num_classes is not None:
                hparams["net"]["num_classes"] = num_classes
                hparams["classes"] = None
            try:
                with torch.device("meta"):
                    return CRASMRAModule.from_hparams(hparams)
            except (TypeError, ValueError, KeyError) as err:
                raise CheckpointError(
                    f"{self._start_path} describes a network that cannot be built "
                    f"({' '.join(str(err).split())}); use the checkpoint as `crasmra fit` "
                    "wrote it."
                ) from err

        def _check_against_checkpoint(self, module: Any, what: str) -> None:
            shapes = self._start_shapes or {}
            expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            missing = sorted(set(expected) - set(shapes))
            unexpected = sorted(set(shapes) - set(expected))
            wrong = [(k, shapes[k], v) for k, v in expected.items()
                     if k in shapes and shapes[k] != v]
            if not (missing or unexpected or wrong):
                return
            if wrong:
                key, got, want = wrong[0]
                detail = (f"{len(wrong)} weight(s) of another shape (first: {key} is {got} in the "
                          f"file, {want} in the network)")
            else:
                detail = (f"{len(missing)} weight(s) missing (first: {missing[:2]}) and "
                          f"{len(unexpected)} unexpected (first: {unexpected[:2]})")
            raise CheckpointError(
                f"--ckpt_path {self._start_path} does not fit the network {what} describe: "
                f"{detail}. Pass the options the checkpoint was trained with (or none, for "
                "`test`/`validate`), or use the checkpoint as `crasmra fit` wrote it."
            )

        def before_checkpoint_hparams(self) -> dict[str, Any] | None:
            # LightningCLI reads --ckpt_path with a bare torch.load to recover hyperparameters,
            # before any crasmra hook runs; validating the file first turns a truncated,
            # tampered or foreign checkpoint into one clear error instead of a traceback.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if not (ckpt_path and Path(ckpt_path).is_file()):
                return None
            checkpoint = self._read_start_checkpoint(ckpt_path)
            hparams = checkpoint.get("hyper_parameters")
            if isinstance(hparams, dict) and "_class_path" not in hparams:
                # Before Lightning parses them (a list of 100,000 class names alone takes
                # minutes) and builds the network they describe.
                self._check_against_checkpoint(self._skeleton(hparams), "its hyperparameters")
                # A checkpoint written before the parts holds them flat: parsed in their parts.
                hparams = nest_flat_hparams(hparams)
            if subcommand in ("validate", "test"):
                self._data_from_checkpoint(subcommand, checkpoint)
            return hparams if isinstance(hparams, dict) else {}

        def _data_from_checkpoint(self, subcommand: str, checkpoint: dict[str, Any]) -> None:
            # Evaluating a checkpoint without any data option means "on the data it was trained
            # on": the checkpoint stores those settings, the parser's defaults are another set.
            stored = checkpoint.get("datamodule_hyper_parameters")
            if not isinstance(stored, dict):
                return
            given = self.config[subcommand].data.as_dict()
            defaults = subcommand_parser(self, subcommand).get_defaults().data.as_dict()
            # data.backbone follows model.backbone (a link), whatever the user gave.
            given.pop("backbone", None)
            defaults.pop("backbone", None)
            if given != defaults:
                return
            # Only the settings that select the images and their transform, each checked as a
            # command-line value would be (a file's batch size or worker count is not taken).
            stored = check_data_settings(stored, self._start_path or "--ckpt_path")
            self.config = self.parser.parse_object({subcommand: {"data": stored}}, self.config)
            log.info(
                "No --data options or --config: evaluating on the data the checkpoint was "
                "trained with (dataset %s%s).",
                stored.get("dataset"),
                f" at {stored['root']}" if stored.get("root") else "",
            )

        def before_fit(self) -> None:
            root = Path(self.trainer.default_root_dir)
            check_free_space(root, self.model)
            self._announce_cpu()
            log.info("Model: %s", describe_model(self.model))
            if self.config.fit.get("overwrite") and not self.config.fit.get("ckpt_path"):
                # Only now, once the configuration, the data and the network have been checked:
                # bad input must never cost the earlier run.
                clear_earlier_run(root)
            # Without a validation split (--data.val_fraction 0, the paper's protocol) best.ckpt
            # is the final epoch: it is never chosen on anything but validation.
            if keep_final_epoch_without_validation(
                self.trainer, getattr(self.datamodule, "has_val", True)
            ):
                # Lightning's note on the empty validation loader says nothing new then.
                warnings.filterwarnings("ignore", message="Total length of .* across ranks is zero")

        def _evaluation_folder(self) -> None:
            # Lightning notes that a checkpoint from another folder does not restore the
            # checkpoint callback's bookkeeping; an evaluation needs none of it.
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
            # A stand-alone evaluation keeps its metrics.json beside its metrics.csv, in
            # ROOT/validate or ROOT/test, out of the training run's record.
            folder = Path(self.trainer.default_root_dir) / self.subcommand
            for callback in self.trainer.callbacks:
                if isinstance(callback, MetricsFileCallback):
                    callback.folder = folder

        def before_validate(self) -> None:
            self._evaluation_folder()
            if not getattr(self.datamodule, "has_val", True):
                raise UsageError(
                    "`validate` needs a validation split and this data has none (the paper "
                    "recipes train on the whole training split). Add --data.val_fraction 0.1 "
                    "(the value the run was trained with, so that the split is the same), or "
                    "evaluate on the test split with `crasmra test`."
                )
            self._announce_cpu()

        def before_test(self) -> None:
            self._evaluation_folder()
            self._announce_cpu()

        def after_fit(self) -> None:
            if not self.config.fit.get("test_after_fit", True):
                return
            ckpt = self.trainer.checkpoint_callback
            # best.ckpt: the best epoch by validation, or the final epoch without validation.
            best = getattr(ckpt, "best_model_path", "") or None
            if self.trainer.interrupted:
                return
            self.trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path=best, verbose=self.verbose_test
            )

    #: Whether the test after `fit` prints Lightning's table (the demo prints its own).
    CRASMRACLI.verbose_test = True  # type: ignore[attr-defined]
    #: The --config files of the command line (set by run_lightning): never written over.
    CRASMRACLI.input_files = ()  # type: ignore[attr-defined]
    CRASMRACLI.persistent_callbacks = lambda: [  # type: ignore[attr-defined]
        RNGStateCallback(),
        SeededLoaderWorkers(),
        RunInfoCallback(),
        MetricsFileCallback(MONITOR),
    ]
    return CRASMRACLI


def describe_model(module: Any) -> str:
    """One line for the log: the backbone, the variant and the parameter counts.

    It replaces Lightning's model summary table, whose FLOPs column reads 0 for this module.
    """
    config = getattr(getattr(module, "net", None), "config", {}) or {}
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    name = f"{config.get('backbone', type(module).__name__)} {config.get('variant', '')}".strip()
    return f"{name}, {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable)"


def run_lightning(args: Sequence[str] | dict[str, Any], verbose_test: bool = True) -> Any:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``) and return the CLI object.

    Args:
        args: The command line after ``crasmra``, or a parsed config.
        verbose_test: Whether the test after ``fit`` prints Lightning's metrics table.
    """
    from crasmra.callbacks import AtomicSaveConfig
    from crasmra.data import FGVCDataModule
    from crasmra.engine import CRASMRAModule

    inputs = config_files(args) if not isinstance(args, dict) else []
    args = expand_config_args(args) if not isinstance(args, dict) else args
    check_class_paths(args)
    refuse_moved_flags(args)
    cli_class = make_cli_class()
    cli_class.verbose_test = verbose_test
    cli_class.input_files = tuple(inputs)
    # `args` is how every crasmra entry point (main, demo, sweep) hands LightningCLI its
    # arguments; LightningCLI's warning about sys.argv also being set does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return cli_class(
        CRASMRAModule,
        FGVCDataModule,
        save_config_callback=AtomicSaveConfig,
        save_config_kwargs={"overwrite": True, "inputs": inputs},
        trainer_defaults={
            "default_root_dir": "runs/crasmra",
            # One line from before_fit instead (describe_model).
            "enable_model_summary": False,
            "callbacks": cli_class.persistent_callbacks(),
        },
        seed_everything_default=0,
        parser_kwargs={"description": "crasmra: CRA-SMRA fine-grained visual classification"},
        args=args,
    )
