"""Code figures: the sizes the refactoring issue tracks, measured from the source tree, in one JSON line.

    python benchmarks/bench_code.py                                # the tree this script sits in
    python benchmarks/bench_code.py --suite-log suite.txt          # + the suite's time and counts
    python benchmarks/bench_code.py --smoke                        # seconds; also parses a built-in summary line

Figures (each key of the JSON line):
  stage_lines         lines of stages/rollout.py, stages/score.py and stages/runner.py (null where absent)
  longest_function    per folder (pipeline/, stages/, cache/): the longest function or method, by
                      end_lineno - lineno + 1 of its `def` (ast; decorators not counted): name, file, lines
  files_over_450      the .py files of pipeline/, stages/, cache/, configs/, benchmarks/ longer than 450
                      lines: [{"file", "lines"}], longest first
  many_params         functions of those folders with more than 6 parameters (positional-only, positional
                      and keyword-only; self/cls, *args and **kwargs not counted; an explicit __init__ of a
                      @dataclass class left out): count and ["file:name:count", ...]
  ruff                `ruff check .` and `ruff format --check .` (run here): clean or not, and the
                      violation / would-reformat counts
  cpu                 from `lscpu`: the model name and whether avx512_bf16, amx_bf16, avx2 are in its flags
  suite               with --suite-log FILE (a `pytest -q` output): wall seconds and the counts of its final
                      summary line ("12 passed, 1 skipped in 83.20s (0:01:23)"); null without it

`--smoke`: the same figures (they take a second or two) and, without --suite-log, the suite figures of a
built-in summary line, so that the parser runs too.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_FILES = ("stages/rollout.py", "stages/score.py", "stages/runner.py")
LONGEST_IN = ("pipeline", "stages", "cache")
SIZE_IN = ("pipeline", "stages", "cache", "configs", "benchmarks")
MAX_LINES = 450
MAX_PARAMS = 6
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx2")
SMOKE_SUMMARY = "====== 3 failed, 120 passed, 4 skipped, 1 xfailed, 2 warnings in 345.67s (0:05:45) ======"


def _py_files(root: Path, folder: str) -> list[Path]:
    return sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _functions(tree: ast.AST):
    """(qualified name, node, enclosing class node or None) of every def, methods and nested ones included."""

    def walk(node, prefix: str, owner):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child, owner
                yield from walk(child, f"{name}.", None)
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.", child)
            else:
                yield from walk(child, prefix, owner)

    yield from walk(tree, "", None)


def _is_dataclass(cls: ast.ClassDef | None) -> bool:
    if cls is None:
        return False
    for d in cls.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def _param_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional-only + positional + keyword-only parameters, without self/cls, *args, **kwargs."""
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def code_figures(root: Path) -> dict:
    parsed = {}
    for folder in SIZE_IN:
        for path in _py_files(root, folder):
            rel = path.relative_to(root).as_posix()
            try:
                parsed[rel] = (ast.parse(path.read_text(), filename=rel), _lines(path))
            except SyntaxError as e:
                raise SystemExit(f"{rel}: does not parse ({e})") from e
    longest = {}
    for folder in LONGEST_IN:
        best = None
        for rel, (tree, _) in parsed.items():
            if not rel.startswith(folder + "/"):
                continue
            for name, fn, _owner in _functions(tree):
                n = fn.end_lineno - fn.lineno + 1
                if best is None or n > best["lines"]:
                    best = {"name": name, "file": rel, "lines": n}
        longest[folder] = best
    over = sorted(
        ({"file": rel, "lines": n} for rel, (_, n) in parsed.items() if n > MAX_LINES), key=lambda x: -x["lines"]
    )
    many = []
    for rel, (tree, _) in parsed.items():
        for name, fn, owner in _functions(tree):
            if fn.name == "__init__" and _is_dataclass(owner):
                continue
            count = _param_count(fn)
            if count > MAX_PARAMS:
                many.append(f"{rel}:{name}:{count}")
    stage_lines = {}
    for rel in STAGE_FILES:
        path = root / rel
        stage_lines[rel] = _lines(path) if path.is_file() else None
    return {
        "stage_lines": stage_lines,
        "longest_function": longest,
        "files_over_450": over,
        "many_params": {"count": len(many), "functions": sorted(many)},
        "files_scanned": len(parsed),
    }


def ruff_figures(root: Path) -> dict:
    """`ruff check .` and `ruff format --check .` from the repository root (its pyproject's settings)."""
    ruff = [sys.executable, "-m", "ruff"]
    check = subprocess.run(
        ruff + ["check", ".", "--output-format", "json"], cwd=root, capture_output=True, text=True, check=False
    )
    try:
        violations = len(json.loads(check.stdout or "[]"))
    except ValueError:
        violations = None  # ruff did not run (not installed?): the status says so
    fmt = subprocess.run(ruff + ["format", "--check", "."], cwd=root, capture_output=True, text=True, check=False)
    said = re.search(r"(\d+) files? would be reformatted", fmt.stdout + fmt.stderr)
    reformat = int(said.group(1)) if said else 0
    return {
        "check_clean": check.returncode == 0,
        "check_violations": violations,
        "format_clean": fmt.returncode == 0,
        "format_would_reformat": reformat,
    }


def cpu_figures() -> dict:
    out: dict = {"model": None, **{f: None for f in CPU_FLAGS}}
    if not shutil.which("lscpu"):
        return {**out, "source": "lscpu not found"}
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, env={"LC_ALL": "C"}).stdout
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}
    flags = set(fields.get("Flags", "").split())
    out["model"] = fields.get("Model name")
    out.update({f: f in flags for f in CPU_FLAGS} if flags else {})
    return {**out, "source": "lscpu"}


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|warnings?|deselected|rerun)")
_WALL = re.compile(r" in (\d+(?:\.\d+)?)s\b")


def parse_suite(text: str) -> dict | None:
    """The counts and wall seconds of a pytest output's final summary line; None without one."""
    for line in reversed(text.splitlines()):
        wall = _WALL.search(line)
        counts = _COUNT.findall(line)
        if wall and counts:
            out = {"wall_s": float(wall.group(1))}
            for n, what in counts:
                key = {"error": "errors", "warning": "warnings"}.get(what, what)
                out[key] = out.get(key, 0) + int(n)
            for key in ("passed", "failed", "skipped", "errors"):
                out.setdefault(key, 0)
            out["tests"] = (
                out["passed"] + out["failed"] + out["skipped"] + out.get("xfailed", 0) + out.get("xpassed", 0)
            )
            out["summary_line"] = line.strip("= ").strip()
            return out
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT), help="repository root (default: the one this script is in)")
    ap.add_argument("--suite-log", help="a `pytest -q` output whose last summary line gives the suite's figures")
    ap.add_argument("--smoke", action="store_true", help="seconds: also parses a built-in summary line")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    suite = None
    if args.suite_log:
        suite = parse_suite(Path(args.suite_log).read_text(errors="replace"))
        if suite is None:
            ap.error(f"{args.suite_log}: no pytest summary line (`N passed ... in S s`) found")
        suite["source"] = args.suite_log
    elif args.smoke:
        suite = {**parse_suite(SMOKE_SUMMARY), "source": "built-in example line (--smoke)"}
    record = {
        "bench": "code",
        "root": str(root),
        **code_figures(root),
        "ruff": ruff_figures(root),
        "cpu": cpu_figures(),
        "suite": suite,
        "python": platform.python_version(),
        "smoke": args.smoke,
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
