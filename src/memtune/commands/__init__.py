"""CLI subcommands, one module per pipeline stage, each exposing `register(subparsers)`.

Options of typed configs are generated from their dataclass fields (help text included), so
the CLI and the configs cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import types
import typing
from typing import Any


def _field_type(tp: Any) -> tuple[Any, type | None]:
    """(scalar type, container: list, tuple or None) of a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(args[0])
    if origin in (list, tuple):  # list[T], tuple[T, ...]
        return typing.get_args(tp)[0], origin
    if origin is typing.Literal:
        return str, None
    return tp, None


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = (), prefix: str = ""
) -> None:
    """One `--field-name` option per dataclass field; defaults are left to the dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp, container = _field_type(hints[f.name])
        option = "--" + prefix + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {"dest": prefix.replace("-", "_") + f.name, "default": argparse.SUPPRESS}
        literal = _literal_of(hints[f.name])
        if typing.get_origin(literal) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(literal))
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif container is not None:
            kwargs["type"] = lambda s, t=tp, c=container: c(t(x.strip()) for x in s.split(",") if x.strip())
            help_text += " (comma-separated)"
        else:
            kwargs["type"] = tp
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        if default is not None and default is not dataclasses.MISSING:
            help_text += f" [default: {default}]"
        parser.add_argument(option, help=help_text, **kwargs)


def _literal_of(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def dataclass_kwargs(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` that were given on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        key = prefix.replace("-", "_") + f.name
        if hasattr(args, key):
            out[f.name] = getattr(args, key)
    return out


def _number(kind: type, low: float, strict: bool, accepted: str):
    """An argparse type: a finite number of `kind` above (or, not `strict`, at) `low`; anything
    else is a one-line error naming the value and what is accepted."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {accepted}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {accepted}")
        return value

    parse.__name__ = accepted
    return parse


positive_int = _number(int, 0, True, "a positive integer")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a positive number")
non_negative_float = _number(float, 0.0, False, "a number >= 0")


def add_data_arguments(parser: argparse.ArgumentParser, help: str, default: str | None = None,
                       limit: bool = True) -> None:
    """`--data SOURCE`, `--format` and (optionally) `--limit`: what a training stage reads."""
    from memtune.batches import DATA_KINDS

    if default is None:
        parser.add_argument("--data", required=True, help=help)
    else:
        parser.add_argument("--data", default=default, help=f"{help} [default: {default}]")
    parser.add_argument("--format", default="auto", choices=DATA_KINDS, help="how to read --data")
    if limit:
        parser.add_argument("--limit", type=non_negative_int, default=None, help="use the first N items only")


def add_output_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """`--out DIR` (written atomically) and `--overwrite`."""
    parser.add_argument("--out", required=True, help=help)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads`, applied by `memtune.cli.main` before the command runs."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (1 is fastest on a busy machine) [default: torch's choice]")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
