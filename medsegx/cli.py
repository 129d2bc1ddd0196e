"""The ``medsegx`` command (also ``python -m medsegx``): every entry point as a verb.

    medsegx pretrain ...            = python pretrain.py ...
    medsegx finetune ...            = python finetune.py ...
    medsegx evaluate-internal ...   = python evaluate_internal.py ...
    medsegx evaluate-external ...   = python evaluate_external.py ...
    medsegx predict ...             = python predict.py ...
    medsegx prepare ...             = python prepare_data.py ...
    medsegx serve --model_type lite --root scans/   (a web viewer and API, docs/SERVE.md)
    medsegx export --model_type lite --format onnx -o lite_onnx/
    medsegx params --model_type vit_b
    medsegx compare A.csv B.csv --labels zero-shot ConMoAE

Each verb is a parser (``medsegx.args``, no torch: ``--help`` is instant) and a recipe
(``medsegx.recipes``, imported only when the command runs). The top-level scripts are thin shims
over the same commands.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import args as cli_args
from .errors import user_errors


@dataclass(frozen=True)
class Command:
    """One entry point: its parser and the recipe that runs it (``module:function``)."""

    name: str
    help: str
    make_parser: Callable[[str | None], argparse.ArgumentParser]
    recipe: str
    script: str | None = None  # the paper's top-level script, if there is one
    distributed: bool = False  # runs through runtime.launch (DDP workers, torchrun)

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        return self.make_parser(prog or f"medsegx {self.name}")

    def run(self, args: argparse.Namespace) -> Any:
        """Run the recipe on parsed ``args``; user errors end it with ``error: ...`` and status 2."""
        module, function = self.recipe.split(":")
        with user_errors(args):
            recipe = getattr(importlib.import_module(module), function)
            if not self.distributed:
                return recipe(args)
            from .runtime import launch

        return launch(recipe, args)


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("pretrain", "pre-train ConMoAE on MedSegDB's train/ split",
            lambda prog: cli_args.train_parser("Pre-train MedSegX on MedSegDB", finetune=False, prog=prog),
            "medsegx.recipes.pretrain:run", "pretrain.py", distributed=True),
    Command("finetune", "fine-tune on each OOD site (and data ratio)",
            lambda prog: cli_args.train_parser("Fine-tune MedSegX on out-of-distribution sites", finetune=True,
                                               prog=prog),
            "medsegx.recipes.finetune:run", "finetune.py", distributed=True),
    Command("evaluate-internal", "the paper's ID evaluation (eval/ID)",
            lambda prog: cli_args.eval_parser("MedSegX internal (ID) evaluation", external=False, prog=prog),
            "medsegx.recipes.evaluate:run_internal", "evaluate_internal.py", distributed=True),
    Command("evaluate-external", "the paper's OOD / RealWorld evaluation",
            lambda prog: cli_args.eval_parser("MedSegX external (OOD / RealWorld) evaluation", external=True,
                                              prog=prog),
            "medsegx.recipes.evaluate:run_external", "evaluate_external.py", distributed=True),
    Command("predict", "segment your own scans (a volume or image in, a mask in its geometry out)",
            cli_args.predict_parser, "medsegx.recipes.predict:run", "predict.py", distributed=True),
    Command("prepare", "convert NIfTI / NRRD / MHA / DICOM / PNG data into MedSegDB slices",
            cli_args.prepare_parser, "medsegx.recipes.prepare:run", "prepare_data.py"),
    Command("serve", "a viewer in the browser and a JSON API: draw boxes, correct, save labels",
            cli_args.serve_parser, "medsegx.recipes.serve:run"),
    Command("export", "write a model for deployment outside PyTorch (ONNX encoder + decoder and a JSON)",
            cli_args.export_parser, "medsegx.recipes.export:run"),
    Command("params", "trainable parameters of a model type, by part", cli_args.params_parser,
            "medsegx.recipes.tools:params"),
    Command("compare", "per-task DSC of two report CSVs", cli_args.compare_parser, "medsegx.recipes.tools:compare"),
)}


def before_exit() -> None:
    """The last call of a script whose process ends now: the objects still alive (torch's modules, the model)
    go to the collector's permanent generation (:func:`gc.freeze`), so that the interpreter's exit does not
    walk them all once more (~0.5 s after importing torch). Not for a process that goes on: what is frozen
    is never collected."""
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = "\n".join(f"  {c.name:<19} {c.help}" for c in COMMANDS.values())
    top = argparse.ArgumentParser(prog="medsegx", formatter_class=argparse.RawDescriptionHelpFormatter,
                                  description="MedSegX: a generalist foundation model for open-world medical image "
                                              "segmentation.", epilog=f"commands:\n{verbs}\n\n"
                                              "'medsegx <command> --help' describes each command.")
    top.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of the commands below")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return None
    command = top.parse_args(argv[:1]).command
    cmd = COMMANDS[command]
    return cmd.run(cmd.parser().parse_args(argv[1:]))


if __name__ == "__main__":
    main()
