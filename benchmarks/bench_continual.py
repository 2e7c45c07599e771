"""Continual learning, measured: learn new facts without losing old behaviour (`opd sft`, self-teachers).

The on-policy distillation recipe's rows plus self-distillation fine-tuning, on SmolLM2-135M-Instruct:
    base               the instruct model
    sft                `opd sft` on the handbook facts (configs/continual/handbook_sft.jsonl: documents
                       and QA pairs), the `continual` preset's round 0
    sft+self-distil xk then k rounds of `opd run`: on-policy distillation from run.teacher = "self:start"
                       (the weights before the SFT) on open chat prompts (Alpaca seed tasks by default)
    sdft               the `sdft` preset: run.teacher = "self" with the fact in the teacher's prompt
                       (score.teacher_context_field = "fact"), on the handbook's training questions
Each row: handbook_qa answer_match (the facts, asked in other words than the training text),
handbook_qa_seen's (asked in the SFT data's own words: what was memorised) and ifeval_lite
prompt_strict / inst_strict (lm-evaluation-harness, opd's offline tasks), with the wall seconds of the
steps that made the model. Then the continual run's held-out reverse KL to the base model
(the `self:start` teacher), round by round, on MT-Bench first turns; and handbook_qa_in_context on the
base (the held-out questions with the fact in the prompt, as the sdft teacher sees it: the ceiling of
what that teacher can teach).

    python3 benchmarks/bench_continual.py --out /tmp/continual
    python3 benchmarks/bench_continual.py --out /tmp/continual --limit 50 --distil-rounds 1   # shorter

JSON lines on stdout, also in OUT/continual.jsonl; then a table. Re-running resumes (every stage does).
The sdft run's base benchmark is the continual run's (the same model and settings): its files are
copied, not computed twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from opd.cache.rundir import RunDir
from opd.pipeline.bench_table import bench_rows, heldout_figures

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = "handbook_qa,handbook_qa_seen,ifeval_lite"
# Sized for a 2-core CPU (the 135M model learns at ~60-100 tokens/s in float32 there): the self-distil
# round on 64 chat prompts × 2 samples of ≤ 64 tokens, one epoch; SDFT on every handbook question × 1
# sample of ≤ 32 tokens, two epochs; the SFT as the preset has it (3 epochs over the 442 rows).
CONTINUAL = {"rollout.max_prompts": "64", "rollout.max_new_tokens": "64", "train.epochs": "1"}
SDFT = {"rollout.n": "1", "rollout.max_new_tokens": "32", "eval.max_prompts": "16"}
METRICS = (
    "handbook_qa/answer_match",
    "handbook_qa_seen/answer_match",
    "ifeval_lite/prompt_strict",
    "ifeval_lite/inst_strict",
)


def opd(*args: str) -> float:
    """Run one opd command (its output to this process's stderr); its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "opd.pipeline.cli", *args], check=True, stdout=sys.stderr)
    return round(time.perf_counter() - t0, 1)


def sets(values: dict[str, str]) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


def heldout_file(out: Path, source: Path, limit: int) -> Path:
    """MT-Bench's first turns as a prompt file in OUT (read from the shared data, never copied in)."""
    path = out / "mt_bench_first_turns.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:limit]
    path.write_text("".join(json.dumps({"id": str(r["question_id"]), "prompt": r["turns"][0]}) + "\n" for r in rows))
    return path


def bench_metrics(run: RunDir, r: int) -> dict:
    row = next((b for b in bench_rows(run) if b.round == r), None)
    return row.metrics if row else {}


def figures(run: RunDir, r: int) -> dict:
    metrics = bench_metrics(run, r)
    out = {}
    for m in METRICS:
        out[m] = metrics.get(m)
        out[f"{m}_stderr"] = metrics.get(f"{m}_stderr")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the two runs")
    ap.add_argument("--chat-prompts", default=str(SHARED / "alpaca_seed_tasks.jsonl"))
    ap.add_argument("--heldout", default=str(SHARED / "mt_bench_question.jsonl"))
    ap.add_argument("--heldout-prompts", type=int, default=24)
    ap.add_argument("--limit", type=int, default=0, help="documents per task (0 = all)")
    ap.add_argument("--distil-rounds", type=int, default=2, help="self-distillation rounds after the SFT")
    ap.add_argument("--sdft-rounds", type=int, default=1)
    ap.add_argument("--no-sdft", action="store_true", help="only the continual run (another SFT setting, say)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="more --set items for both runs")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"eval.tasks_limit": str(a.limit)}
    extra = [x for s in a.extra for x in ("--set", s)]
    lines: list[dict] = []

    def emit(rec: dict) -> None:
        lines.append(rec)
        print(json.dumps(rec), flush=True)

    # the continual run: base, SFT, SFT → self-distil from self:start
    cont = out / "continual"
    heldout = heldout_file(out, Path(a.heldout), a.heldout_prompts)
    if not (cont / "opd.toml").exists():
        chat = {
            "rollout.prompts": json.dumps(a.chat_prompts),
            "rollout.prompt_field": '"instruction"',
            "rollout.id_field": '"id"',
            "eval.prompts": json.dumps(str(heldout)),
            **CONTINUAL,
        }
        opd("init", str(cont), "--config", "continual", *sets({**common, **chat}), *extra)
    run = RunDir(str(cont))
    base_s = opd("eval", str(cont), "--round", "0", "--tasks", TASKS)
    emit({"recipe": "base", "steps_s": {"bench": base_s}, **figures(run, 0)})
    ctx_s = opd("eval", str(cont), "--round", "0", "--tasks", "handbook_qa_in_context")
    ceiling = {k: v for k, v in bench_metrics(run, 0).items() if k.startswith("handbook_qa_in_context/")}
    emit({"figure": "base_with_the_fact_in_the_prompt", "steps_s": {"bench": ctx_s}, **ceiling})
    sft_s = opd("sft", str(cont), "--round", "0")  # (a re-run without --round would be a second SFT round)
    bench_s = opd("eval", str(cont), "--round", "1", "--tasks", TASKS)
    emit({"recipe": "sft", "steps_s": {"sft": sft_s, "bench": bench_s}, **figures(run, 1)})
    for k in range(1, a.distil_rounds + 1):  # round k, then the student after it (round k + 1) benchmarked
        distil_s = opd("run", str(cont), "--rounds", str(k))
        steps = {"sft": sft_s, "self_distil_round": distil_s}
        emit({"recipe": f"sft+self-distil x{k}", "steps_s": steps, **figures(run, k + 1)})
    rkl = {
        f"{r} (after {'sft' if r == 1 else f'{r - 1} self-distil round(s)'})": heldout_figures(run, r).get(
            "heldout_rkl"
        )
        for r in range(1, a.distil_rounds + 2)
    }
    emit({"figure": "heldout_rkl_to_base", "by_round": {"0 (base)": 0.0, **rkl}})

    if a.no_sdft:
        (out / "continual.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        print(table(lines), file=sys.stderr)
        return
    # SDFT: the model its own teacher, the fact in the teacher's prompt
    sd = out / "sdft"
    if not (sd / "opd.toml").exists():
        opd("init", str(sd), "--config", "sdft", *sets({**common, **SDFT, "run.rounds": str(a.sdft_rounds)}), *extra)
        dst = sd / "rounds" / "0000" / "eval"
        dst.mkdir(parents=True, exist_ok=True)
        for f in (cont / "rounds" / "0000" / "eval").glob("*.json"):
            shutil.copy2(f, dst / f.name)
    sd_run = RunDir(str(sd))
    sdft_s = opd("run", str(sd))
    last = a.sdft_rounds
    emit({"recipe": "sdft", "steps_s": {"sdft_run": sdft_s}, **figures(sd_run, last)})
    emit(
        {
            "figure": "sdft_heldout_rkl_to_in_context_self",
            "by_round": {r: heldout_figures(sd_run, r).get("heldout_rkl") for r in range(last + 1)},
        }
    )
    (out / "continual.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    print(table(lines), file=sys.stderr)


def table(lines: list[dict]) -> str:
    def cell(rec, m):
        v, e = rec.get(m), rec.get(f"{m}_stderr")
        return "-" if v is None else f"{v:.3f}" + (f" ± {e:.3f}" if e is not None else "")

    rows = [r for r in lines if "recipe" in r]
    head = (
        f"{'recipe':<16} {'knowledge QA':>16} {'seen wording':>16} {'IF prompt':>16} {'IF instruction':>16}  steps (s)"
    )
    body = [f"{r['recipe']:<16} " + " ".join(f"{cell(r, m):>16}" for m in METRICS) + f"  {r['steps_s']}" for r in rows]
    return "\n".join([head, *body])


if __name__ == "__main__":
    main()
