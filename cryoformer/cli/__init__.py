"""The ``cryoformer`` command-line tool.

Sub-commands follow cryoDRGN's verbs where they exist, so users can move between the tools.
Each sub-command lives in its own module exposing ``add_parser(subparsers)`` and ``run(args)``;
argparse stays here, in the CLI layer, and the library only sees frozen dataclass configs.

Errors that a user causes (a missing file, a wrong column) are :class:`~cryoformer.errors.InputError`:
they print one line naming the file and the field and exit with status 2, with a traceback only
under ``--debug``. Outputs are written to temporary names and renamed, so a failed command never
leaves a partial file behind. Every command refuses to replace an existing output unless
``--force`` is given, and refuses outright to write over one of its own inputs
(:mod:`cryoformer.io.guard`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from typing import List, Optional

from cryoformer import __version__
from cryoformer.errors import InputError
from cryoformer.io.guard import WRITE_ERRNOS

# Order = order in --help. Each module has add_parser(subparsers) and run(args).
_COMMAND_MODULES = (
    "cryoformer.cli.simulate_cmd",
    "cryoformer.cli.project_cmd",
    "cryoformer.cli.parse_poses_cmd",
    "cryoformer.cli.parse_ctf_cmd",
    "cryoformer.cli.downsample_cmd",
    "cryoformer.cli.fsc_cmd",
    "cryoformer.cli.train_cmd",
    "cryoformer.cli.analyze_cmd",
    "cryoformer.cli.eval_vol_cmd",
    "cryoformer.cli.traverse_cmd",
    "cryoformer.cli.evaluate_cmd",
    "cryoformer.cli.export_cmd",
    "cryoformer.cli.demo_cmd",
)

EXIT_INPUT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="cryoformer",
        description="Continuous heterogeneous cryo-EM reconstruction (CryoFormer).",
    )
    parser.add_argument("--version", action="version", version=f"cryoformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        cmd_parser = module.add_parser(sub)
        cmd_parser.add_argument(
            "--debug", action="store_true", help="show full tracebacks on errors"
        )
        cmd_parser.add_argument(
            "--force", action="store_true",
            help="replace outputs that already exist (an input is never overwritten, even so)"
        )
        cmd_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the tool; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args._run(args)
    except InputError as err:
        if args.debug:
            traceback.print_exc()
        print(f"cryoformer {args.command}: error: {err.one_line()}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as err:
        # A disk that filled up or a permission lost while writing something not covered by
        # the atomic writers (a log appended to, a directory made): still one line.
        if err.errno not in WRITE_ERRNOS and not isinstance(err, FileNotFoundError):
            raise
        if args.debug:
            traceback.print_exc()
        where = err.filename if err.filename else "output"
        print(f"cryoformer {args.command}: error: {where}: {err.strerror or err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"cryoformer {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
