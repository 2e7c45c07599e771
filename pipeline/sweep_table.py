"""A sweep's table: one row per setting (its grid values, loss first/last, train seconds, eval figures),
sorted by the chosen metric with the best marked; printed, and written as CSV, Markdown and a PNG of the
metric per setting (each file atomically)."""

from __future__ import annotations

import io
import json
from typing import Any

import polars as pl

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, read_manifest

SWEEP_FORMAT, SWEEP_VERSION = "opd.sweep", 1
SWEEP_FILE, RESULTS_FILE, CACHE_EVAL_FILE = "sweep.json", "results.json", "sweep_eval.json"

# metric → whether higher is better; the default metric per eval mode
METRICS = {
    "heldout_rkl": False,
    "accuracy": True,
    "heldout_teacher_nll": False,
    "cache_rkl": False,
    "cache_fkl": False,
    "cache_nll": False,
    "last_loss": False,
}
DEFAULT_METRIC = {"heldout": "heldout_rkl", "cache": "cache_rkl", "none": "last_loss"}
FIGURES = ("first_loss", "last_loss", "train_s", "cache_rkl", "cache_fkl", "cache_nll", "heldout_rkl", "accuracy")
START = "(start)"  # the row of the student the sweep's settings start from, when it was evaluated


def check_metric(metric: str, eval_mode: str) -> str:
    """The metric to sort by (default: the eval mode's main figure); one-line error if it does not exist."""
    metric = metric or DEFAULT_METRIC[eval_mode]
    if metric not in METRICS:
        raise OpdError(f"--metric {metric!r} is unknown (one of: {', '.join(METRICS)})")
    needs = "cache" if metric.startswith("cache_") else "heldout" if metric not in ("last_loss",) else None
    if needs and needs != eval_mode:
        raise OpdError(f"--metric {metric} needs --eval {needs} (this sweep evaluates with --eval {eval_mode})")
    return metric


def build(rows: list[dict[str, Any]], keys: list[str], metric: str, start: dict[str, Any] | None) -> pl.DataFrame:
    """Rows sorted by `metric` (best first, missing last), column `best` = "*" on the best; the start
    student's row (when evaluated) last, unranked."""
    figures = [f for f in FIGURES if any(r.get(f) is not None for r in rows + ([start] if start else []))]
    cols = ["setting", *keys, *figures]
    records = [{c: r.get(c) for c in cols} for r in rows]
    df = pl.DataFrame(records, schema=_schema(records, cols), orient="row")
    if metric in df.columns:
        df = df.sort(metric, descending=METRICS[metric], nulls_last=True)
        best = df[metric][0] if df.height and df[metric][0] is not None else None
        df = df.with_columns(
            pl.when(pl.col(metric) == best).then(pl.lit("*")).otherwise(pl.lit("")).alias("best")
            if best is not None
            else pl.lit("").alias("best")
        )
    else:
        df = df.with_columns(pl.lit("").alias("best"))
    df = df.select(["best", *cols])
    if start:
        extra = {c: start.get(c) for c in cols} | {"setting": START, "best": ""}
        df = pl.concat([df, pl.DataFrame([extra], schema=df.schema, orient="row")])
    return df


def _schema(records: list[dict], cols: list[str]) -> dict:
    schema = {}
    for c in cols:
        values = [r[c] for r in records if r.get(c) is not None]
        if c == "setting" or any(isinstance(v, str) for v in values):
            schema[c] = pl.String
        elif values and all(isinstance(v, bool) for v in values):
            schema[c] = pl.Boolean
        elif values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            schema[c] = pl.Int64
        else:
            schema[c] = pl.Float64
    return schema


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        a = abs(v)
        return "0" if a == 0 else f"{v:.4g}" if a >= 1 else f"{v:.4f}" if a >= 1e-3 else f"{v:.2e}"
    return str(v)


def to_text(df: pl.DataFrame) -> str:
    """Fixed width, numbers right-aligned."""
    cells = [list(df.columns)] + [[_cell(v) for v in row] for row in df.iter_rows()]
    widths = [max(len(line[i]) for line in cells) for i in range(len(df.columns))]
    text_cols = {c for c, t in df.schema.items() if t == pl.String}
    return "\n".join(
        " ".join(s.ljust(w) if c in text_cols else s.rjust(w) for c, s, w in zip(df.columns, line, widths)).rstrip()
        for line in cells
    )


def to_markdown(df: pl.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" if t == pl.String else "---:" for t in df.schema.values()) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join([head, rule, *body]) + "\n"


def plot_png(df: pl.DataFrame, metric: str, title: str) -> bytes:
    """A bar per setting of `metric` (the best one highlighted, the start student's in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = df["setting"].to_list()
    values = [v if v is not None else 0.0 for v in (df[metric].to_list() if metric in df.columns else [])]
    colors = ["tab:orange" if b == "*" else "tab:gray" if n == START else "tab:blue" for b, n in zip(df["best"], names)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 2), 4.0))
    if values:
        ax.bar(range(len(names)), values, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(metric + (" (higher is better)" if METRICS.get(metric) else " (lower is better)"))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write(fs, folder: str, df: pl.DataFrame, metric: str, title: str) -> dict[str, str]:
    """table.csv, table.md, table.png in the sweep folder; returns their paths."""
    paths = {ext: storage.join(folder, f"table.{ext}") for ext in ("csv", "md", "png")}
    storage.atomic_write_bytes(fs, paths["csv"], df.write_csv().encode())
    storage.atomic_write_bytes(fs, paths["md"], (f"{title}\n\n" + to_markdown(df)).encode())
    storage.atomic_write_bytes(fs, paths["png"], plot_png(df, metric, title))
    return paths


def read_json(fs, path: str) -> dict | None:
    """A small JSON object file, or None when it is missing or unreadable (then it is redone)."""
    if not storage.exists(fs, path):
        return None
    try:
        d = json.loads(storage.read_bytes(fs, path))
        return d if isinstance(d, dict) else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------ listing


def list_sweeps(run: RunDir) -> list[str]:
    """One line per sweep of a run (for `opd inspect`)."""
    folder = storage.join(run.root, "sweeps")
    if not storage.exists(run.fs, folder):
        return []
    lines = []
    for name in sorted(storage.listdir(run.fs, folder)):
        spec = read_json(run.fs, storage.join(folder, name, SWEEP_FILE))
        if not spec or spec.get("format") != SWEEP_FORMAT:
            continue
        res = read_json(run.fs, storage.join(folder, name, RESULTS_FILE))
        n = len(spec.get("settings", []))
        grid = " × ".join(f"{k.split('.', 1)[1]} {{{','.join(v)}}}" for k, v in spec.get("grid", {}).items())
        if res and res.get("version") == SWEEP_VERSION and len(res.get("rows", [])) >= n:
            best = next((r for r in res["rows"] if r.get("best") == "*"), None)
            metric = res.get("metric")
            tail = (
                f"best {best['setting']} ({metric} {best[metric]:.4g})"
                if best and best.get(metric) is not None
                else "done"
            )
            tail += f"; table {storage.join(folder, name, 'table.md')}"
        else:
            trained = sum(
                read_manifest(run, storage.join(folder, name, s["name"], "rounds", f"{spec['round']:04d}", "student"))
                is not None
                for s in spec.get("settings", [])
            )
            tail = f"{trained}/{n} trained, no table yet"
        lines.append(f"sweep {name}: round {spec.get('round')}, {grid} ({n} settings, eval {spec.get('eval')}): {tail}")
    return lines
