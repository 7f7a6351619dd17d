"""The `train`, `merge-lora` and `quickstart` sub-commands of the `videorefer` command."""

import argparse


def _train(args: argparse.Namespace) -> int:
    from .sft import main

    return main(args.arguments)


def _merge_lora(args: argparse.Namespace) -> int:
    from .lora import merge_lora

    print(merge_lora(args.adapter, args.output_dir, base_model=args.base_model))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import FAST, FULL, run_quickstart

    run_quickstart(
        args.output_dir,
        seed=args.seed,
        size=FAST if args.fast else FULL,
        recipe=args.recipe,
        report=args.report,
        progress=not args.no_progress,
    )
    return 0


def add_training_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Adds `train`, `merge-lora` and `quickstart` to the `videorefer` command's sub-commands."""
    # Everything after `train` goes to the recipe parser (its own --help too): "-" is no option prefix here.
    train = subparsers.add_parser(
        "train",
        help="run a training stage: videorefer train --config recipes/.../config_full.yaml [--field value ...]",
        add_help=False,
        prefix_chars="+",
    )
    train.add_argument(
        "arguments",
        nargs=argparse.REMAINDER,
        help="--config RECIPE.yaml and any recipe field as --field value (see --help)",
    )
    train.set_defaults(func=_train)

    merge = subparsers.add_parser(
        "merge-lora", help="merge a LoRA adapter into its base model: a plain checkpoint the Auto classes load"
    )
    merge.add_argument("adapter", help="the LoRA training output (or one of its checkpoints)")
    merge.add_argument("output_dir", help="where the merged checkpoint goes")
    merge.add_argument("--base-model", default=None, help="the base checkpoint; read from the adapter by default")
    merge.set_defaults(func=_merge_lora)

    quickstart = subparsers.add_parser(
        "quickstart",
        help="offline demo: make synthetic videos, train a tiny VideoRefer from scratch, report accuracy",
    )
    quickstart.add_argument("--output-dir", default="videorefer-quickstart", help="data, model and report folder")
    quickstart.add_argument("--report", default=None, help="write the accuracy table as JSON to this path")
    quickstart.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the training")
    quickstart.add_argument(
        "--recipe", default=None, help="recipe YAML; recipes/quickstart/config_full.yaml by default"
    )
    quickstart.add_argument("--fast", action="store_true", help="a few videos and steps: checks the pipeline only")
    quickstart.add_argument("--no-progress", action="store_true", help="no progress bars")
    quickstart.set_defaults(func=_quickstart)


__all__ = ["add_training_parsers"]
