"""The `offramp` command. Each subcommand lives beside what it drives and registers itself here.

Subcommand modules are found through the `offramp.commands` entry points (pyproject.toml), so this
module never names the offline packages (calibration/, bench/): the server side imports nothing
from them, and they import from it.
"""
import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from server.errors import UsageError

ENTRY_POINT_GROUP = "offramp.commands"


def command_modules() -> list[str]:
    """Modules exposing `register(subparsers)`, in the order their commands are listed."""
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    return [entry.value for entry in found]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp", description="LLM serving with confidence-routed early exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = command_modules()
    if not modules:
        raise RuntimeError(f"no {ENTRY_POINT_GROUP} entry points: install the package (pip install -e .)")
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from server.model.exit_heads import HeadSetError
    from server.model.loader import ModelLoadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ModelLoadError, HeadSetError, UsageError, ValueError) as err:
        print(f"offramp {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
