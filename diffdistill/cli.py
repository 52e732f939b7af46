"""The ``diffdistill`` command line: thin wrappers that parse, build a config and call the library.

    diffdistill distill --config train_scripts/digits/lcm.yaml --output runs/lcm
    diffdistill bench assets/digits-sd --steps 1,2,4,8,50 --output reports/teacher
    diffdistill export runs/lcm --output runs/lcm/pipeline-step500 --checkpoint checkpoint-500
    diffdistill sds --prompt "a handwritten digit 7" --output runs/sds-7

Every flag of ``distill`` comes from a config dataclass field (its help text and default live there); a
field several methods declare must have one default and one help text there (``shared_flags`` refuses to
build the parser otherwise), and ``distill --method X --help`` lists only the run's and X's flags.
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

from .config import SECTIONS, RunConfig, _flag, _resolve_type, build_run_config, load_yaml
from .errors import RUN_FAILED, USAGE_ERROR, RunFailed, Terminated, UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _default(f: dataclasses.Field) -> typing.Any:
    """A dataclass field's default value (a fresh one for a default_factory)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def shared_flags(configs: dict[str, type], reserved: typing.Iterable[type] = ()) -> dict[str, list[str]]:
    """Field name -> the names of the ``configs`` that declare it, for one flag per field name.

    Raises TypeError, when the parser is built, if two configs declare a field of the same name with a different
    default or help text (the one flag would mean two things), or a config declares a field of a ``reserved``
    class (the run's own options, which would take its flag)."""
    taken = {f.name for cls in reserved for f in dataclasses.fields(cls)}
    users: dict[str, list[str]] = {}
    first: dict[str, tuple[str, typing.Any, str]] = {}
    for name, cls in configs.items():
        for f in dataclasses.fields(cls):
            if f.name in taken:
                raise TypeError(f"{_flag(f.name)} of {name} ({cls.__name__}) is also a run option: rename the field")
            this = (name, _default(f), f.metadata.get("help", ""))
            other = first.setdefault(f.name, this)
            if other[1:] != this[1:]:
                raise TypeError(f"{_flag(f.name)} is declared by {other[0]} (default {other[1]!r}, help {other[2]!r}) "
                                f"and by {name} (default {this[1]!r}, help {this[2]!r}): one flag must mean one thing; "
                                f"define the field once (a shared base class or field function) or give it two names")
            users.setdefault(f.name, []).append(name)
    return users


def _add_fields(group, cls, seen: set[str], note: typing.Callable[[str], str] = lambda field: "",
                hidden: bool = False) -> None:
    """Add one flag per dataclass field; defaults stay in the dataclass (argparse leaves unset flags out).

    ``hidden`` flags parse but stay out of --help. The former names in ``cls.FORMER_OPTIONS`` parse too, hidden,
    so that the config reports what became of them instead of argparse calling them unrecognised."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("train", "data", "method_args") or f.name in seen:
            continue
        seen.add(f.name)
        tp = _resolve_type(hints[f.name])
        default = _default(f)
        shown = "none" if default is None else repr(default) if isinstance(default, str) else default
        help_text = argparse.SUPPRESS if hidden else f"{f.metadata.get('help', '')} (default: {shown}{note(f.name)})"
        if tp is bool:
            group.add_argument(_flag(f.name), dest=f.name, nargs="?", const="true", default=argparse.SUPPRESS,
                               metavar="BOOL", help=help_text)
        else:
            metavar = {int: "INT", float: "FLOAT"}.get(tp, "STR")
            group.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
    for name in getattr(cls, "FORMER_OPTIONS", {}):
        if name not in seen:
            seen.add(name)
            group.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _method_named(argv: list[str]) -> str | None:
    """The value of ``--method`` on the command line, if any (``distill --method X --help`` shows X's flags only)."""
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.partition("=")[2]
    return None


def add_distill_parser(sub, method: str | None = None) -> None:
    """``diffdistill distill``: train a few-step student and export it; with ``method`` (a registered one) --help
    lists that method's flags only (the others still parse, so that the config can name their method)."""
    from .methods import METHODS

    p = sub.add_parser("distill", help="distil a teacher into a few-step student and export it",
                       description="Distil a Stable Diffusion teacher into a few-step student, export a diffusers "
                                   "pipeline, verify it and write a model card. Values: dataclass defaults < "
                                   "--config YAML < flags. `--method NAME --help` lists that method's flags only.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", help="YAML preset (e.g. train_scripts/digits/lcm.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit without training")
    # a flag several methods share must mean one thing, and names them all in its help
    users = shared_flags({name: spec.config_cls for name, spec in METHODS.items()}, (RunConfig, *SECTIONS.values()))
    seen: set[str] = set()
    _add_fields(p.add_argument_group("run"), RunConfig, seen)
    for name, cls in SECTIONS.items():
        _add_fields(p.add_argument_group(name), cls, seen)
    method = method if method in METHODS else None  # an unknown one fails later, listing the methods
    for name, spec in sorted(METHODS.items(), key=lambda item: item[0] != method):  # the shown method first
        hidden = method not in (None, name)
        group = p if hidden else p.add_argument_group(f"--method {name}", spec.summary)
        _add_fields(group, spec.config_cls, seen, note=lambda field: f"; --method {', '.join(users[field])}",
                    hidden=hidden)
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
    from .sds_optimize import SDSOptimizeConfig

    p = sub.add_parser("sds", help="optimise images for a prompt with score-distillation sampling (SDS)",
                       description="Optimise latents for --prompt with SDS against the teacher; writes result.png, "
                                   "progress.png and result.json (with digit accuracy for digits-SD prompts).")
    _add_fields(p, SDSOptimizeConfig, set())
    p.set_defaults(func=cmd_sds)


def cmd_sds(args: argparse.Namespace) -> int:
    """Run ``sds`` from parsed arguments."""
    from .config import build_dataclass
    from .sds_optimize import SDSOptimizeConfig, run_sds

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    result = run_sds(build_dataclass(SDSOptimizeConfig, values, "sds options"))
    print(json.dumps(result, indent=2))
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full ``diffdistill`` parser with every subcommand (``argv``: the command line it will parse, for
    ``distill --method X --help``)."""
    from . import __version__
    from .eval import cli as bench_cli

    parser = OneLineParser(prog="diffdistill", description="Distil diffusers diffusion models into few-step students, "
                           "export them as diffusers pipelines, and benchmark FID/IS/KID against sampling steps.")
    parser.add_argument("--version", action="version", version=f"diffdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    add_distill_parser(sub, _method_named(argv or []))
    bench_cli.add_parser(sub)
    add_export_parser(sub)
    add_sds_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffdistill`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
