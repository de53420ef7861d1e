"""Kill `memtune learn` and `memtune experiment` (SIGKILL) at random points on a tiny model and
check what is left: no partial run folder looks finished, a rerun finishes, nothing finished
earlier is lost.

    .venv/bin/python benchmarks/bench_kills.py --trials 20      # ~10 min on 2 busy cores

Prints one line per trial and a summary (the Reliability section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

RUN_FILES = {"config.json", "metrics.jsonl", "model", "results.json"}
MEMORY = {"layers": [1], "n_keys": 16, "heads": 2, "knn": 4, "k_dim": 8}


def memtune(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "memtune.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finished_learn(run: Path) -> bool:
    """A run folder that exists must be complete: every file, results readable."""
    if not run.exists():
        return False
    names = {p.name for p in run.iterdir()}
    assert names == RUN_FILES, f"partial run folder {run}: {sorted(names)}"
    json.loads((run / "results.json").read_text())
    return True


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "report" not in p.parts and not any(x.startswith(".") for x in p.parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="kills per command [default: 20]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["learn", "experiment"], default=None, help="kill only this command")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    from tiny import save_tiny_model

    root = Path(tempfile.mkdtemp(prefix="memtune-kills-"))
    save_tiny_model(root / "tiny")
    facts = [{"question": f"What is the capital of Zorbia {i}?", "answer": f"Quen{i}",
              "statement": f"The capital of Zorbia {i} is Quen{i}.", "id": f"z/{i}"} for i in range(8)]
    (root / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts))
    (root / "known.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts[6:]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEMTUNE_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    learn = ["learn", "--method", "full", "--model", str(root / "tiny"), "--data", str(root / "facts.jsonl"),
             "--epochs", "30", "--batch-size", "2", "--threads", "1"]

    results = {"learn": [], "experiment": []}
    if args.only != "experiment":
        kill_learn(root, learn, env, rng, args.trials, results)
    if args.only != "learn":
        kill_experiment(root, env, rng, args.trials, results)
    print(json.dumps({k: {"trials": len(v), "killed": sum(bool(r.get("killed", r.get("kills_at_s"))) for r in v)}
                      for k, v in results.items()}))


def kill_learn(root: Path, learn: list[str], env: dict, rng: random.Random, trials: int, results: dict) -> None:
    # Time one whole run, to kill at random points inside it.
    start = time.perf_counter()
    assert memtune([*learn, "--out", str(root / "timing")], env).wait() == 0
    whole = time.perf_counter() - start
    print(f"learn: one run takes {whole:.1f} s")
    for trial in range(trials):
        run = root / f"learn{trial}"
        before = {p.name: snapshot(p) for p in root.glob("learn*") if p.is_dir()}
        proc = memtune([*learn, "--out", str(run)], env)
        at = rng.uniform(0.2, 1.1) * whole
        time.sleep(at)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = finished_learn(run)
        rerun = memtune([*learn, "--out", str(run), *(["--overwrite"] if done else [])], env).wait()
        assert rerun == 0 and finished_learn(run), f"trial {trial}: rerun failed ({rerun})"
        lost = [n for n, files in before.items() if snapshot(root / n) != files]
        assert not lost, f"trial {trial}: finished runs changed: {lost}"
        results["learn"].append({"at_s": round(at, 1), "killed": killed, "left_finished": done})
        print(f"learn trial {trial}: kill at {at:.1f} s ({'killed' if killed else 'had finished'}), "
              f"folder {'finished' if done else 'absent'}, rerun ok, earlier runs intact")


def kill_experiment(root: Path, env: dict, rng: random.Random, trials: int, results: dict) -> None:
    import yaml

    config = {"name": "kills", "model": str(root / "tiny"), "memory": MEMORY,
              "background": {"data": "prose:background", "batches": 2, "batch_size": 2, "max_length": 32},
              "stream": {"kind": "facts", "data": str(root / "facts.jsonl"), "chunks": 2, "target": "statement"},
              "probes": {"known": str(root / "known.jsonl"), "text": {"source": "prose:heldout", "limit": 1},
                         "max_new_tokens": 3, "max_length": 32},
              "methods": [{"name": "smf", "method": "smf", "top_t": 8, "lr": 1.0, "epochs": 4, "batch_size": 2},
                          {"name": "full", "method": "full", "lr": 1e-3, "epochs": 4, "batch_size": 2},
                          {"name": "lora", "method": "lora", "lr": 1e-3, "epochs": 4, "batch_size": 2}]}
    (root / "exp.yaml").write_text(yaml.safe_dump(config))
    experiment = ["experiment", str(root / "exp.yaml"), "--no-report", "--threads", "1"]
    start = time.perf_counter()
    assert memtune([*experiment, "--out", str(root / "exp_timing")], env).wait() == 0
    whole = time.perf_counter() - start
    reference = {n: json.loads((root / "exp_timing" / n / "results.json").read_text()) for n in ("smf", "full", "lora")}
    print(f"experiment: one run takes {whole:.1f} s")
    for trial in range(trials):
        out = root / f"exp{trial}"
        killed_runs = []
        for _ in range(2):  # kill twice, then let it finish: finished runs must survive each kill
            finished = {n: snapshot(out / n) for n in ("smf", "full", "lora") if (out / n / "results.json").exists()}
            proc = memtune([*experiment, "--out", str(out)], env)
            at = rng.uniform(0.1, 1.0) * whole
            time.sleep(at)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed_runs.append(round(at, 1))
            proc.wait()
            for n, files in finished.items():
                assert snapshot(out / n) == files, f"experiment trial {trial}: finished run {n} changed"
            for n in ("smf", "full", "lora"):
                if (out / n).exists():
                    assert (out / n / "results.json").exists(), f"experiment trial {trial}: partial run {n}"
        assert memtune([*experiment, "--out", str(out)], env).wait() == 0, f"experiment trial {trial}: rerun failed"
        for n, ref in reference.items():
            got = json.loads((out / n / "results.json").read_text())
            assert got["learning"] == ref["learning"], f"experiment trial {trial}: {n} differs after kills"
        results["experiment"].append({"kills_at_s": killed_runs})
        print(f"experiment trial {trial}: killed at {killed_runs} s, finished runs kept, rerun finished with "
              "the same learning as an uninterrupted run")


if __name__ == "__main__":
    main()
