"""How steady a plan by time is: the models of ``benchmarks/peers.py`` planned several times in a row.

Run from the repository root (about half a minute on a 2-core machine)::

    python benchmarks/plan_repeat.py                     # each model, K=2, 4 plans, one thread
    python benchmarks/plan_repeat.py --models resnet --plans 8
    python benchmarks/plan_repeat.py --fresh --plans 12 --out benchmarks/results/plan_repeat_fresh.json
                                                         # each plan in a process of its own: about 3 minutes

Each plan times the model's pieces anew (:func:`lightning_ddg.plan` with ``balance_by="time"``, on ``peers.py``'s
batch); on a machine whose speed drifts, the cut it picks can move from one plan to the next. With ``--fresh``,
each plan runs in a fresh process, as a fit's rank 0 plans once soon after it starts. Prints every plan's cut and
its first stage's share of the planned time, and writes them to ``--out``.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import MODELS, batches, build  # noqa: E402

from lightning_ddg import plan  # noqa: E402


def one_plan(model: str, stages: int) -> dict:
    """The cut of one plan of ``model``, and its first stage's share of the planned time."""
    xs, _ = batches(model, 1, MODELS[model][2], torch.device("cpu"))
    chosen = plan(build(model), xs[0], stages, balance_by="time")
    costs = [s.cost for s in chosen.stages]
    return {"split_points": chosen.split_points, "first_stage_share": costs[0] / sum(costs)}


def fresh_plan(model: str, stages: int) -> dict:
    """:func:`one_plan` in a process of its own."""
    command = [sys.executable, os.path.abspath(__file__), "--one", model, "--stages", str(stages)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--plans", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="each plan in a fresh process")
    parser.add_argument("--one", choices=list(MODELS), help=argparse.SUPPRESS)  # a fresh process's plan
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_repeat.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(one_plan(args.one, args.stages)))
        return
    results = {}
    for model in args.models:
        plans = [(fresh_plan if args.fresh else one_plan)(model, args.stages) for _ in range(args.plans)]
        results[model] = plans
        cuts = Counter(", ".join(p["split_points"]) for p in plans)
        shares = [p["first_stage_share"] for p in plans]
        print(
            f"{model}: cuts {dict(cuts)}; first stage's share of the planned time {min(shares):.2f}-{max(shares):.2f}"
        )
    args.out.write_text(json.dumps({"stages": args.stages, "fresh": args.fresh, "models": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
