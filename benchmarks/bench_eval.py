"""Benchmarks each round: what they cost against the round, and how much of the teacher − base gap closed.

    opd demo --out opd-demo && python3 benchmarks/bench_eval.py opd-demo
    opd run task --config smollm2-task && python3 benchmarks/bench_eval.py task

Reads a finished run (nothing is run or written): the loop's "loop" records (wall seconds of each
stage it launched, process start included) and the benchmark results (pipeline/bench_table.py).
Prints one JSON line per round that was benchmarked:
    bench_s          wall seconds of that round's `opd eval --tasks` worker
    round_s          rollout + score + train wall seconds of the same round (train: 0 for the final
                     student, which is not trained)
    bench_fraction   bench_s ÷ (round_s + bench_s): the share of a round the benchmark takes (None for
                     the final student, which is not trained: no round of its own)
    metrics          TASK/METRIC → value, and TASK/METRIC_stderr
then one line per metric with the gap closed by the last student, (s − base) ÷ (teacher − base), and
the standard errors of the three accuracies, and one line with the teacher's benchmark wall seconds
(its `opd eval --tasks --teacher` worker, once per run).
Every line carries the machine record (CPU model and bf16 capability).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

from opd.cache.rundir import RunDir  # noqa: E402
from opd.pipeline.bench_table import bench_rows, gap_closed, metric_names  # noqa: E402


def _walls(run: RunDir, r: int) -> dict[str, float]:
    """Wall seconds per launched stage of round r (several records of one stage are summed)."""
    out: dict[str, float] = {}
    for rec in run.read_metrics(r):
        if rec.get("stage") == "loop" and isinstance(rec.get("wall_s"), (int, float)):
            out[rec["step"]] = out.get(rec["step"], 0.0) + float(rec["wall_s"])
    return out


def figures(run_dir: str) -> list[dict]:
    """The JSON lines of the module docstring for one run."""
    run = RunDir(run_dir)
    rows = bench_rows(run)
    lines = []
    for row in rows:
        if row.round is None:
            continue
        walls = _walls(run, row.round)
        bench_s = walls.get("bench")
        if bench_s is None:
            continue  # benchmarked by hand, not by the loop: no wall time to compare
        round_s = sum(walls.get(s, 0.0) for s in ("rollout", "score", "train"))
        lines.append(
            {
                "bench": "eval_round",
                "run": run_dir,
                "round": row.round,
                "bench_s": round(bench_s, 1),
                "round_s": round(round_s, 1),
                "bench_fraction": round(bench_s / (round_s + bench_s), 3) if "train" in walls else None,
                "heldout_rkl": row.heldout_rkl,
                "metrics": row.metrics,
            }
        )
    for name in metric_names(rows):
        found = gap_closed(rows, name)
        if found is None:
            continue
        gap, last = found
        teacher = next(r for r in rows if r.round is None)
        base = next(r for r in rows if r.round == 0)
        lines.append(
            {
                "bench": "gap_closed",
                "run": run_dir,
                "metric": name,
                "gap_closed": round(gap, 3),
                "student_round": last.round,
                **{
                    f"{who}_{k}": m.metrics.get(name if k == "value" else f"{name}_stderr")
                    for who, m in (("teacher", teacher), ("base", base), ("student", last))
                    for k in ("value", "stderr")
                },
            }
        )
    teacher_s = _walls(run, 0).get("bench_teacher") if run.rounds() else None
    lines.append({"bench": "eval_teacher", "run": run_dir, "bench_s": teacher_s})
    return [{**line, **machine()} for line in lines]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run folders (opd demo, opd run with eval.tasks)")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        for line in figures(run_dir):
            print(json.dumps(line))


if __name__ == "__main__":
    main()
