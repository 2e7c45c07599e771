"""The benchmark table of a run: teacher, base student and each evaluated student on every task metric.

Reads RUN/reference/teacher/eval/*.json and RUN/rounds/R/eval/*.json (pipeline/benchmark.py writes them:
lm-eval's results JSON) and, beside them, each round's held-out reverse KL (heldout/eval.json). Student R
is the student that starts round R: R rounds trained, 0 = the base student. `opd inspect` and `opd demo`
print it; `opd inspect --plot` draws it (one curve per task metric, teacher and base as horizontal lines).

Gap closed, per metric, by the last evaluated student s:  (s − base) ÷ (teacher − base), with the
binomial (or bootstrap) standard error lm-eval reports beside each accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from opd.cache import storage
from opd.cache.rundir import RunDir
from opd.pipeline.benchmark import summarize


@dataclass(frozen=True)
class BenchRow:
    """One evaluated model's figures."""

    label: str  # "teacher", "student 0 (base)", "student R"
    round: int | None  # None = the teacher
    metrics: dict[str, float]  # TASK/METRIC and TASK/METRIC_stderr → value
    heldout_rkl: float | None  # the round's held-out reverse KL (students only, where evaluated)


def _tasks(run: RunDir, folder: str) -> list[str]:
    return sorted(n[:-5] for n in storage.listdir(run.fs, folder) if n.endswith(".json"))


def bench_rows(run: RunDir) -> list[BenchRow]:
    """The teacher (if benchmarked), then every round whose starting student was benchmarked."""
    rows = []
    teacher_dir = run.bench_dir(None)
    teacher = summarize(run, teacher_dir, _tasks(run, teacher_dir))[0]
    if teacher:
        rows.append(BenchRow("teacher", None, teacher, None))
    for r in run.rounds():
        folder = run.bench_dir(r)
        metrics = summarize(run, folder, _tasks(run, folder))[0]
        if metrics:
            rkl = heldout_figures(run, r).get("heldout_rkl")
            rkl = float(rkl) if isinstance(rkl, (int, float)) and not isinstance(rkl, bool) else None
            rows.append(BenchRow("student 0 (base)" if r == 0 else f"student {r}", r, metrics, rkl))
    return rows


def metric_names(rows: list[BenchRow]) -> list[str]:
    names = {k for row in rows for k in row.metrics if not k.endswith("_stderr")}
    return sorted(names)


def format_bench_table(rows: list[BenchRow]) -> str:
    """Fixed-width: one row per model, `value±stderr` per metric, the held-out reverse KL beside them,
    then the gap each metric's last student closed."""
    if not rows:
        return ""
    names = metric_names(rows)
    header = ["model", *names, "hoRKL"]
    lines = [header]
    for row in rows:
        cells = [row.label]
        for name in names:
            v, e = row.metrics.get(name), row.metrics.get(f"{name}_stderr")
            cells.append("-" if v is None else f"{v:.3f}" + (f"±{e:.3f}" if e is not None else ""))
        cells.append("-" if row.heldout_rkl is None else f"{row.heldout_rkl:.4f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        " ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines
    ]
    text += [g for g in (gap_line(rows, name) for name in names) if g]
    return "\n".join(text)


def gap_closed(rows: list[BenchRow], name: str) -> tuple[float, BenchRow] | None:
    """(s − base) ÷ (teacher − base) of metric `name` for the last student s after the base; None when
    the teacher, the base or a later student is missing, or the teacher does not differ from the base."""
    teacher = next((r for r in rows if r.round is None and name in r.metrics), None)
    base = next((r for r in rows if r.round == 0 and name in r.metrics), None)
    last = next((r for r in reversed(rows) if r.round and name in r.metrics), None)
    if teacher is None or base is None or last is None or teacher.metrics[name] == base.metrics[name]:
        return None
    t, b = teacher.metrics[name], base.metrics[name]
    return (last.metrics[name] - b) / (t - b), last


def gap_line(rows: list[BenchRow], name: str) -> str:
    found = gap_closed(rows, name)
    if found is None:
        return ""
    gap, last = found
    return f"gap closed on {name} by {last.label}: {gap:.2f} of the teacher − base gap"


def heldout_figures(run: RunDir, r: int, records: list[dict] = ()) -> dict:
    """Round r's held-out figures for a table: heldout/eval.json if it reads as a JSON object, else the
    last of the round's "eval" metrics `records`, else {} (a table shows what it can; `opd eval` checks)."""
    path = run.eval_path(r)
    if storage.exists(run.fs, path):
        try:
            d = json.loads(storage.read_bytes(run.fs, path))
        except ValueError:
            d = None
        if isinstance(d, dict):
            return d
    return records[-1] if records else {}


def bench_panel(ax, rows: list[BenchRow]) -> None:
    """One curve per task metric over the students' rounds (error bars: its standard error); the teacher
    as a dashed and the base student as a dotted horizontal line of the same colour."""
    for i, name in enumerate(metric_names(rows)):
        color = f"C{i % 10}"
        students = [r for r in rows if r.round is not None and name in r.metrics]
        xs = [r.round for r in students]
        ys = [r.metrics[name] for r in students]
        errs = [r.metrics.get(f"{name}_stderr", 0.0) for r in students]
        ax.errorbar(xs, ys, yerr=errs, fmt="o-", color=color, label=f"{name} (students)", capsize=3)
        for r in rows:
            if name in r.metrics and r.round in (None, 0):
                style, who = ("--", "teacher") if r.round is None else (":", "base")
                ax.axhline(r.metrics[name], linestyle=style, color=color, alpha=0.7, label=f"{name} ({who})")
    ax.set_title("benchmarks (lm-eval) of the student after R rounds")
    ax.set_xlabel("round")
    ax.set_ylabel("score")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
