"""The `offramp` command. Each subcommand lives beside what it drives and registers itself here."""
import argparse
import importlib
import logging
import sys

# Modules exposing `register(subparsers)`; each adds one or more subcommands.
COMMAND_MODULES = [
    "server.commands",
    "server.api.serve",
    "calibration.tune_cli",
    "bench.cli",
    "calibration.cli",
]

DEFAULT_MODEL = "smollm2-135m"


class UsageError(Exception):
    """A user mistake that deserves one clear line, not a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp", description="LLM serving with confidence-routed early exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
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
