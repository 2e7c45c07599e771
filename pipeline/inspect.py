"""`opd inspect RUN [--plot out.png]`: a per-round table of a run, and plots of its per-round curves.

Reads, for every round folder RUN/rounds/NNNN (nothing is written into the run):
    rollouts/_DONE.json, scores/_DONE.json, student/_DONE.json   manifests: the finished stages' summaries
    heldout/eval.json                                             the round's held-out figures (preferred)
    metrics.jsonl (object stores: metrics/*.json)                 per-invocation stage records, train steps,
                                                                  "eval" records (fallback for eval.json)
and RUN/opd.toml for the run's name. A round still being worked on shows nulls for what is not there yet,
and a `status` naming the first unfinished stage. Lines of metrics.jsonl that do not parse (a process
killed mid-write) are skipped.
"""

from __future__ import annotations

import math
import os
import tempfile
import tomllib
from collections.abc import Iterable
from typing import Any

import polars as pl

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import HELDOUT, SFT_STAGE, RunDir, read_manifest
from opd.pipeline.bench_table import BenchRow, bench_panel, bench_rows, format_bench_table, heldout_figures
from opd.pipeline.sweep_table import list_sweeps

# (column, dtype) in table order; `round_table` always returns exactly these.
SCHEMA: dict[str, Any] = {
    "round": pl.Int64,
    "samples": pl.Int64,  # rollout samples (train split)
    "tokens": pl.Int64,  # completion tokens of those samples
    "mean_length": pl.Float64,  # tokens / samples
    "lmbda": pl.Float64,  # λ: fraction of prompts sampled on-policy
    "on_policy": pl.Int64,  # prompts sampled by the student
    "off_policy": pl.Int64,  # prompts given an off-policy (dataset / teacher) response
    "skipped": pl.Int64,  # prompts skipped as too long
    "teacher_topk_mass": pl.Float64,  # mean teacher probability mass inside the stored top-k
    "topk_overlap": pl.Float64,  # student↔teacher top-k overlap, mean over the round's train steps
    "heldout_rkl": pl.Float64,  # held-out per-token reverse KL(student ‖ teacher)
    "heldout_accuracy": pl.Float64,  # held-out answer accuracy (with an eval checker)
    "loss_first": pl.Float64,  # train loss at the first / last logged step
    "loss_last": pl.Float64,
    "rollout_s": pl.Float64,  # wall seconds per stage, summed over its invocations (all splits)
    "score_s": pl.Float64,
    "train_s": pl.Float64,
    "status": pl.Utf8,  # done | rollout | score | train (first unfinished) | eval only | eval | sft (`opd sft`)
}
COLUMNS = tuple(SCHEMA)

# Text-table headers, short enough for ~120 columns; explained by the legend under the table.
_HEADERS = {
    "round": "round",
    "samples": "samples",
    "tokens": "tokens",
    "mean_length": "len",
    "lmbda": "λ",
    "on_policy": "on",
    "off_policy": "off",
    "skipped": "skip",
    "teacher_topk_mass": "Tmass",
    "topk_overlap": "ovlp",
    "heldout_rkl": "hoRKL",
    "heldout_accuracy": "hoAcc",
    "loss_first": "loss0",
    "loss_last": "loss1",
    "rollout_s": "roll_s",
    "score_s": "score_s",
    "train_s": "train_s",
    "status": "status",
}
_LEGEND = (
    "len = mean completion tokens; λ/on/off/skip = on-policy fraction, prompts on-/off-policy, long "
    "prompts skipped;\nTmass = teacher top-k mass; ovlp = student/teacher top-k overlap; hoRKL/hoAcc = "
    "held-out reverse KL/accuracy;\nloss0/loss1 = first/last train loss (sft: cross-entropy); *_s = wall seconds per stage; "
    "- = not there (yet)"
)


# ------------------------------------------------------------------------------------------ the table


def round_table(run_dir: str) -> pl.DataFrame:
    """One row per round folder (sorted), columns `COLUMNS`; null where a figure is unknown or its
    stage has not finished. An initialised run with no rounds gives an empty table."""
    run = RunDir(run_dir)
    run.require_initialised()
    rows = [_round_row(run, r) for r in run.rounds()]
    return pl.DataFrame(rows, schema=SCHEMA, orient="row") if rows else pl.DataFrame(schema=SCHEMA)


def _round_row(run: RunDir, r: int) -> list:
    records = run.read_metrics(r)
    by_stage: dict[str, list[dict]] = {}
    for rec in records:
        by_stage.setdefault(rec.get("stage"), []).append(rec)
    rollouts = read_manifest(run, run.stage_dir(r, "rollouts"))
    scores = read_manifest(run, run.stage_dir(r, "scores"))
    student = read_manifest(run, run.stage_dir(r, "student"))
    ro = rollouts.summary if rollouts else {}
    sc = scores.summary if scores else {}
    st = student.summary if student else {}

    learner = by_stage.get("train", []) + by_stage.get("sft", [])  # an SFT round's learner logs as "sft"
    steps = _train_steps(learner)
    finals = [rec for rec in learner if rec.get("final") and not rec.get("skipped")]
    last_final = finals[-1] if finals else {}
    ev = heldout_figures(run, r, by_stage.get("eval", []))

    samples, tokens = _int(ro.get("samples")), _int(ro.get("completion_tokens"))
    train_s = _stage_seconds(finals, "wall_s")
    if train_s is None and student is not None:
        train_s = _num(st.get("wall_s"))
    row = {
        "round": r,
        "samples": samples,
        "tokens": tokens,
        "mean_length": tokens / samples if samples and tokens is not None else None,
        "lmbda": _num(ro.get("lmbda")),
        "on_policy": _int(ro.get("on_policy_prompts")),
        "off_policy": _int(ro.get("off_policy_prompts")),
        "skipped": _int(ro.get("skipped_long_prompts")),
        "teacher_topk_mass": _first_num(sc.get("mean_topk_mass"), _mean(s.get("teacher_topk_mass") for s in steps)),
        "topk_overlap": _mean(s.get("topk_overlap") for s in steps),
        "heldout_rkl": _num(ev.get("heldout_rkl")),
        "heldout_accuracy": _num(ev.get("accuracy")),
        # a finished student's manifest, else its last summary record, else the steps logged so far
        "loss_first": _first_num(
            st.get("first_loss"), last_final.get("first_loss"), steps[0].get("loss") if steps else None
        ),
        "loss_last": _first_num(
            st.get("last_loss"), last_final.get("last_loss"), steps[-1].get("loss") if steps else None
        ),
        "rollout_s": _stage_seconds(by_stage.get("rollout", []), "seconds"),
        "score_s": _stage_seconds(by_stage.get("score", []), "seconds", "wall_s"),
        "train_s": train_s,
        "status": _status(run, r, rollouts, scores, student, by_stage, ev),
    }
    return [row[c] for c in COLUMNS]


def _status(run: RunDir, r: int, rollouts, scores, student, by_stage: dict, ev: dict) -> str:
    """The first unfinished training stage, or "done"; a round with only held-out data in it (the
    evaluation after the last training round) is "eval only" ("eval" while its figures are missing); a
    round whose student `opd sft` wrote is "sft"."""
    if student is not None and student.producer.get("stage") == SFT_STAGE:
        return "sft"
    names = set(storage.listdir(run.fs, run.round_dir(r)))
    trained = bool(names & {"rollouts", "scores", "student"}) or any(
        rec.get("split", "train") == "train" for s in ("rollout", "score", "train") for rec in by_stage.get(s, [])
    )
    if not trained and (HELDOUT in names or by_stage.get("eval")):
        return "eval only" if ev else "eval"
    if rollouts is None:
        return "rollout"
    if scores is None:
        return "score"
    if student is None:
        return "train"
    return "done"


def _train_steps(records: list[dict]) -> list[dict]:
    """The train-split step records, one per step number (the last logged wins: a resumed learner
    may log a step again), ordered by step."""
    steps: dict[int, dict] = {}
    for rec in records:
        if rec.get("final") or rec.get("split", "train") != "train":
            continue
        step = _int(rec.get("step"))
        if step is not None:
            steps[step] = rec
    return [steps[k] for k in sorted(steps)]


def _stage_seconds(records: list[dict], key: str, old_key: str = "") -> float | None:
    """Sum of `key` over a stage's invocation records (shard workers, retries, held-out split); records
    of skipped invocations carry the finished stage's figures, not their own, so they are left out.
    `old_key`: the name records of runs made before the stage runner used (score: "wall_s")."""
    got = [rec.get(key, rec.get(old_key)) for rec in records if not rec.get("skipped")]
    values = [v for v in map(_num, got) if v is not None]
    return sum(values) if values else None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _int(v: Any) -> int | None:
    f = _num(v)
    return int(f) if f is not None else None


def _first_num(*values: Any) -> float | None:
    return next((f for f in map(_num, values) if f is not None), None)


def _mean(values: Iterable[Any]) -> float | None:
    nums = [f for f in map(_num, values) if f is not None]
    return sum(nums) / len(nums) if nums else None


# ------------------------------------------------------------------------------------------ text


def format_table(df: pl.DataFrame) -> str:
    """A fixed-width table (right-aligned numbers, `-` for null) with short headers and a legend, so a
    whole run fits a ~120-column terminal and reads the same every time."""
    cols = [c for c in COLUMNS if c in df.columns]
    cells = [[_HEADERS[c] for c in cols]]
    for row in df.select(cols).iter_rows(named=True):
        cells.append([_cell(c, row[c]) for c in cols])
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = []
    for line in cells:
        parts = [s.ljust(w) if c == "status" else s.rjust(w) for c, s, w in zip(cols, line, widths)]
        lines.append(" ".join(parts).rstrip())
    if df.height == 0:
        lines.append("(no rounds)")
    return "\n".join(lines) + "\n" + _LEGEND


def _cell(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    if col in ("lmbda", "teacher_topk_mass", "topk_overlap", "heldout_accuracy"):
        return f"{v:.3f}"
    if col == "mean_length" or col.endswith("_s"):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.1f}"
    return _sig(v)


def _sig(v: float) -> str:
    """About four significant digits in at most ~8 characters (losses, KL)."""
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.4g}"
    if a >= 1e-3:
        return f"{v:.4f}"
    if a >= 1e-4:
        return f"{v:.5f}"
    return f"{v:.1e}"


def inspect(run_dir: str, plot_path: str | None = None) -> str:
    """The run's table under a one-line header (run name, path, rounds); writes the plot if asked."""
    run = RunDir(run_dir)
    run.require_initialised()
    df = round_table(run_dir)
    if df.height == 0:
        raise OpdError(f"{storage.join(run.root, 'rounds')}: no rounds yet: run `opd run {run.url}`")
    name = _run_name(run)
    trained = df.filter(pl.col("status").is_in(["done", "sft"])).height
    header = f"run {name} ({run.url}): {df.height} round folder{'s' if df.height != 1 else ''}, {trained} trained"
    text = header + "\n" + format_table(df)
    bench = bench_rows(run)
    if bench:
        text += "\n\nbenchmarks (lm-eval; student R = the student after R rounds):\n" + format_bench_table(bench)
    sweeps = list_sweeps(run)
    if sweeps:
        text += "\n" + "\n".join(sweeps)
    if plot_path:
        plot(df, plot_path, title=f"opd run {name}", bench=bench)
        text += f"\nplot: {plot_path}"
    return text


def _run_name(run: RunDir) -> str:
    """[run].name from opd.toml; the folder name if it is missing or the file does not parse."""
    try:
        name = tomllib.loads(run.read_config_text()).get("run", {}).get("name")
    except tomllib.TOMLDecodeError:
        name = None
    return str(name) if name else (os.path.basename(run.root.rstrip("/")) or run.url)


# ------------------------------------------------------------------------------------------ plot


def plot(df: pl.DataFrame, path: str, title: str | None = None, bench: list[BenchRow] = ()) -> str:
    """A 2×2 PNG of per-round curves: held-out reverse KL (and accuracy), train loss first/last,
    teacher top-k mass and student↔teacher overlap, and stacked stage wall times; with benchmarks, a
    third row of their curves (bench_table.bench_panel). Panels with no data say so. Written to a
    temporary file and renamed into place, so `path` is never a half PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(11, 11 if bench else 7.5), layout="constrained")
    layout = [["kl", "loss"], ["topk", "time"]] + ([["bench", "bench"]] if bench else [])
    axes = fig.subplot_mosaic(layout)
    ax_kl, ax_loss, ax_topk, ax_time = axes["kl"], axes["loss"], axes["topk"], axes["time"]
    if bench:
        bench_panel(axes["bench"], bench)
    rounds = df["round"].to_list() if "round" in df.columns else []
    _heldout_panel(ax_kl, df)
    _lines_panel(
        ax_loss, df, "train loss", (("loss_first", "first step", "o--", "C2"), ("loss_last", "last step", "o-", "C3"))
    )
    _lines_panel(
        ax_topk,
        df,
        "top-k",
        (
            ("teacher_topk_mass", "teacher top-k mass", "o-", "C4"),
            ("topk_overlap", "student↔teacher top-k overlap", "s-", "C5"),
        ),
    )
    _time_panel(ax_time, df, rounds)
    for ax in (ax_kl, ax_loss, ax_topk, ax_time):
        ax.set_xlabel("round")
        if rounds:
            ax.set_xticks(rounds)
            ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def _heldout_panel(ax, df: pl.DataFrame) -> None:
    if not _line(ax, df, "heldout_rkl", "held-out reverse KL", "o-", "C0"):
        _no_data(ax)
    ax.set_title("held-out reverse KL(student ‖ teacher)")
    ax.set_ylabel("nats / token")
    if _points(df, "heldout_accuracy")[0]:
        ax_acc = ax.twinx()
        _line(ax_acc, df, "heldout_accuracy", "held-out accuracy", "s--", "C1")
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_ylim(0, 1)
        _legend(ax, ax_acc)
    else:
        _legend(ax)


def _lines_panel(ax, df: pl.DataFrame, title: str, series) -> None:
    """One line per (column, label, style, color) that has data; "no data" where none has."""
    got = [_line(ax, df, c, label, style, color) for c, label, style, color in series]
    ax.set_title(title)
    if any(got):
        _legend(ax)
    else:
        _no_data(ax)


def _time_panel(ax, df: pl.DataFrame, rounds: list) -> None:
    """Stage wall times per round, stacked."""
    bottom = [0.0] * len(rounds)
    stacked = False
    for col, label, color in (("rollout_s", "rollout", "C0"), ("score_s", "score", "C1"), ("train_s", "train", "C2")):
        vals = [v or 0.0 for v in df[col].to_list()] if col in df.columns else [0.0] * len(rounds)
        if any(vals):
            ax.bar(rounds, vals, bottom=bottom, label=label, color=color, width=0.6)
            bottom = [b + v for b, v in zip(bottom, vals)]
            stacked = True
    ax.set_title("stage wall time")
    ax.set_ylabel("seconds")
    if stacked:
        _legend(ax)
    else:
        _no_data(ax)


def _save_png(fig, path: str) -> str:
    """The figure as a PNG at `path`, written to a temporary file and renamed into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _points(df: pl.DataFrame, col: str) -> tuple[list, list]:
    """(rounds, values) where the column is not null."""
    if col not in df.columns or "round" not in df.columns:
        return [], []
    pairs = [(r, v) for r, v in zip(df["round"].to_list(), df[col].to_list()) if v is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _line(ax, df: pl.DataFrame, col: str, label: str, style: str, color: str) -> bool:
    xs, ys = _points(df, col)
    if xs:
        ax.plot(xs, ys, style, label=label, color=color)
    return bool(xs)


def _legend(*axes) -> None:
    handles, labels = [], []
    for ax in axes:
        h, names = ax.get_legend_handles_labels()
        handles += h
        labels += names
    if handles:
        axes[0].legend(handles, labels, fontsize="small")


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="0.5")
