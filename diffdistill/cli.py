"""The ``diffdistill`` command line: thin wrappers that parse, build a config and call the library.

    diffdistill distill --config train_scripts/digits/lcm.yaml --output runs/lcm
    diffdistill bench assets/digits-sd --steps 1,2,4,8,50 --output reports/teacher
    diffdistill export runs/lcm --output runs/lcm/pipeline-step500 --checkpoint checkpoint-500
    diffdistill sds --prompt "a handwritten digit 7" --output runs/sds-7

Every flag of ``distill`` comes from a config dataclass field (its help text and default live there).
Bad input gives one line ``error: ...`` and exit status 2, never a traceback; a run that fails after it
started (divergence, a file unreadable mid-run) gives one line and exit status 3; SIGTERM gives 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import typing

from .config import SECTIONS, RunConfig, _resolve_type, build_run_config, load_yaml
from .errors import RUN_FAILED, USAGE_ERROR, RunFailed, Terminated, UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_fields(group, cls, seen: set[str], note: typing.Callable[[str], str] = lambda field: "") -> None:
    """Add one flag per dataclass field; defaults stay in the dataclass (argparse leaves unset flags out)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("train", "data", "method_args") or f.name in seen:
            continue
        seen.add(f.name)
        tp = _resolve_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "none" if default is None else repr(default) if isinstance(default, str) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown}{note(f.name)})"
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            group.add_argument(flag, dest=f.name, nargs="?", const="true", default=argparse.SUPPRESS,
                               metavar="BOOL", help=help_text)
        else:
            metavar = {int: "INT", float: "FLOAT"}.get(tp, "STR")
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def add_distill_parser(sub) -> None:
    """``diffdistill distill``: train a few-step student and export it."""
    from .methods import METHODS

    p = sub.add_parser("distill", help="distil a teacher into a few-step student and export it",
                       description="Distil a Stable Diffusion teacher into a few-step student, export a diffusers "
                                   "pipeline, verify it and write a model card. Values: dataclass defaults < "
                                   "--config YAML < flags.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", help="YAML preset (e.g. train_scripts/digits/lcm.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit without training")
    seen: set[str] = set()
    _add_fields(p.add_argument_group("run"), RunConfig, seen)
    for name, cls in SECTIONS.items():
        _add_fields(p.add_argument_group(name), cls, seen)
    users: dict[str, list[str]] = {}  # a flag several methods share names them all in its help
    for name, spec in METHODS.items():
        for f in dataclasses.fields(spec.config_cls):
            users.setdefault(f.name, []).append(name)
    for name, spec in METHODS.items():
        group = p.add_argument_group(f"--method {name}", spec.summary)
        _add_fields(group, spec.config_cls, seen, note=lambda field: f"; --method {', '.join(users[field])}")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    """Run ``distill`` from parsed arguments."""
    from .distill import run_distill

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "dry_run", "func", "command")}
    yaml_values = load_yaml(args.config) if args.config else {}
    run = build_run_config(yaml_values, overrides)
    summary = run_distill(run, dry_run=args.dry_run)
    print(json.dumps(summary if args.dry_run else {k: v for k, v in summary.items() if k != "last_logs"},
                     indent=2, default=str))
    return 0


def add_export_parser(sub) -> None:
    """``diffdistill export``: turn a run's checkpoint into a pipeline folder."""
    p = sub.add_parser("export", help="export a run's checkpoint as a diffusers pipeline",
                       description="Export a checkpoint of a distill run (e.g. an interrupted one) as a diffusers "
                                   "pipeline folder, verified by reload-and-sample.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="folder of a distill run (holds config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint folder name/path")
    p.add_argument("--output", required=True, help="pipeline folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pipeline in --output")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``export`` from parsed arguments."""
    from .export_run import export_checkpoint

    folder = export_checkpoint(args.run_dir, args.checkpoint, args.output, args.overwrite)
    print(f"exported {folder}")
    return 0


def add_sds_parser(sub) -> None:
    """``diffdistill sds``: optimise latents for one prompt with score-distillation sampling."""
    from .sds_optimize import SDSConfig

    p = sub.add_parser("sds", help="optimise images for a prompt with score-distillation sampling (SDS)",
                       description="Optimise latents for --prompt with SDS against the teacher; writes result.png, "
                                   "progress.png and result.json (with digit accuracy for digits-SD prompts).")
    _add_fields(p, SDSConfig, set())
    p.set_defaults(func=cmd_sds)


def cmd_sds(args: argparse.Namespace) -> int:
    """Run ``sds`` from parsed arguments."""
    from .config import build_dataclass
    from .sds_optimize import SDSConfig, run_sds

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    result = run_sds(build_dataclass(SDSConfig, values, "sds options"))
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``diffdistill`` parser with every subcommand."""
    from . import __version__
    from .eval import cli as bench_cli

    parser = OneLineParser(prog="diffdistill", description="Distil diffusers diffusion models into few-step students, "
                           "export them as diffusers pipelines, and benchmark FID/IS/KID against sampling steps.")
    parser.add_argument("--version", action="version", version=f"diffdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    add_distill_parser(sub)
    bench_cli.add_parser(sub)
    add_export_parser(sub)
    add_sds_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffdistill`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    def terminate(signum, _frame):  # the trainer installs its own handler (checkpoint, then exit) while it trains
        raise Terminated(signum)  # unwinds through the writers' clean-up of their temporary folders

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return RUN_FAILED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:  # noqa: BLE001 - interruption and divergence have their own exit paths below
        from .trainer import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(f"interrupted by signal {e.signum}: checkpoint saved to {e.checkpoint}; "
                  f"resume with --resume-from-checkpoint latest", file=sys.stderr)
            return 128 + e.signum
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
