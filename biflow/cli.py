"""`biflow` command line. Each subcommand lives in `biflow/commands/<name>.py` and exposes

    HELP: str                                   # one line for `biflow --help`
    def add_arguments(parser) -> None           # its flags
    def run(args) -> int | None                 # the work; return an exit code (None = 0)

Errors a user can fix (bad config, missing data, corrupt files) are raised as `UserError`
subclasses and printed as one line with exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import biflow.commands as commands_pkg
from biflow.errors import UserError


def add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """--set KEY=VALUE, repeatable, into args.overrides (the same syntax in every command)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_ray_address(p: argparse.ArgumentParser) -> None:
    """--address of the Ray cluster a command runs on."""
    p.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                   help="Ray cluster (host:port, ray://host:port or auto); default: pipeline.ray_address, "
                        "else a local Ray started for this run")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="biflow", description="Bidirectional normalizing flows: train, sample, evaluate, run pipelines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"biflow.commands.{info.name}")
        name = info.name.replace("_", "-")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        code = modules[args.command].run(args)
    except UserError as err:
        print(f"biflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"biflow {args.command}: interrupted (checkpoints written so far are kept)", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
