"""`memtune experiment` and `memtune report`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from memtune.commands import add_threads_argument

log = logging.getLogger("memtune")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment", help="learn a stream of data chunk by chunk with several methods; probe learning and forgetting",
        description="Run a continual-learning experiment from a YAML config (see configs/). Each method (and each "
        "value of a swept option) writes one run folder under --out; rerunning the same command skips finished runs.",
    )
    p.add_argument("config", help="experiment config (.yaml or .json)")
    p.add_argument("--out", default=None, help="output folder [default: runs/<config name>]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set stream.size=50 --set methods.0.lr=0.5 (repeatable)")
    p.add_argument("--only", action="append", default=None, metavar="RUN", help="run only this run (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and list the runs, then stop")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUT/report when done [default: on]")
    add_threads_argument(p)
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("report", help="markdown table and plots (curves, frontier) from experiment runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="experiment folders or single run folders")
    p.add_argument("--out", default=None, help="output folder [default: FIRST_RUN/report]")
    p.set_defaults(func=cmd_report)


def cmd_experiment(args: argparse.Namespace) -> int:
    from memtune.experiment import Experiment, load_config, select_runs
    from memtune.report import write_report

    config, _ = load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / (config.name or Path(args.config).stem))
    if args.dry_run:
        print(json.dumps({"out": str(out), "runs": [r.name for r in select_runs(config, args.only)]}, indent=2))
        return 0
    results = Experiment(config, out).run_all(args.only)
    if args.report:
        write_report([str(out)], out / "report")
        print((out / "report" / "report.md").read_text())
    log.info("%d runs in %s", len(results), out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from memtune.report import write_report

    out = Path(args.out or Path(args.runs[0]) / "report")
    write_report(args.runs, out)
    print((out / "report.md").read_text())
    return 0
