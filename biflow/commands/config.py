"""biflow config show: a pipeline file as a run would see it, every setting beside what it means."""
from __future__ import annotations

import argparse
from pathlib import Path

from biflow.cli import add_overrides

HELP = "inspect configuration: `config show PIPELINE.yaml` prints every setting (defaults filled in) with its meaning"
SHOW_HELP = ("print the resolved config of a pipeline file as YAML: every section and setting, defaults filled in and "
             "`size:` expanded, each with its description as a comment (the output is itself a valid pipeline file)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = "example: biflow config show pipelines/digits.yaml --set reverse_loss.align=0.5"
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help=SHOW_HELP, description=SHOW_HELP, epilog=p.epilog,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    show.add_argument("pipeline", type=Path, help="pipeline file (or experiment config), e.g. pipelines/digits.yaml")
    add_overrides(show, "override a setting as `biflow run` would, e.g. --set reverse_loss.align=0.5 (repeatable)")


def run(args) -> int:
    from biflow.config import commented_yaml
    from biflow.pipeline.spec import load_pipeline

    print(commented_yaml(load_pipeline(args.pipeline, args.overrides)), end="")
    return 0
