"""`memtune` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from memtune.errors import MemtuneError

# Modules under memtune.commands that register subcommands, in the order of the pipeline.
COMMAND_MODULES = ("model", "heal", "learn", "evaluate", "slots", "experiment")


class Parser(argparse.ArgumentParser):
    """No abbreviated options (`--data` must never be read as `--data-file`), and argparse's
    own errors on one line, like memtune's, with exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="memtune",
        description="Teach a language model new facts without forgetting (sparse memory finetuning).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"memtune.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from memtune import distributed
    from memtune.commands import setup_logging

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, its one-line error printed)
        return e.code if isinstance(e.code, int) else 2
    setup_logging(args.verbose)
    distributed.init_from_env()  # under torchrun: join the process group (one process: nothing)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    try:
        distributed.check_command(args.command)
        if getattr(args, "threads", None) is not None:
            if args.threads <= 0:
                raise MemtuneError(f"threads={args.threads} is invalid: expected a positive integer")
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args) or 0
    except MemtuneError as e:
        print(f"memtune {args.command}: error: {distributed.describe_rank()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("memtune").error("%sinterrupted", distributed.describe_rank())
        return 130
    except Exception as e:
        if not distributed.active():
            raise
        # One rank's failure breaks the others' collectives: one line each, traceback with -v.
        logging.getLogger("memtune").debug("traceback", exc_info=True)
        print(f"memtune {args.command}: error: {distributed.describe_rank()}{distributed.describe_failure(e)}",
              file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
