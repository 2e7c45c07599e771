"""End-to-end benchmark: a whole on-policy distillation round with opd against TRL's DistillationTrainer.

Same teacher (SmolLM2-135M-Instruct, `opd:smollm2-135m`), same student (its 8-layer prune,
`opd:smollm2-135m-L8`), same prompts (the first P of configs/tiny_prompts.jsonl, chat template), n = 2
samples per prompt, 64 new tokens, fully on-policy (λ = 1), reverse KL (β = 1), same learning rate,
schedule (cosine to 0, no warmup), AdamW, clipping at 1.0, the same number of optimizer steps and the same
precision on both sides (`--precision auto`, the default, resolved as the presets' dtype = "auto" is, by
opd.stages.devices: bf16 — bf16 autocast over fp32 master weights for the student, a bf16 teacher, bf16
rollout weights — only where this CPU runs bf16 natively (avx512_bf16 / AMX; there bf16 was measured
2.3× faster for a learner step and 3.2× for a teacher forward than float32), else float32, since
emulated bf16 is far slower; `--precision bf16` / `fp32` force one). Every record holds the resolved
dtype, the CPU model and whether torch reports native bf16:

    python benchmarks/bench_e2e.py --case round --quick      # 16 prompts, a few minutes on 2 CPU cores
    python benchmarks/bench_e2e.py --case sweep --quick
    python benchmarks/bench_e2e.py --case all                # 32 prompts (the preset's size), round + sweep + demo
    python benchmarks/bench_e2e.py --smoke                   # about a minute: the round case on tiny models

`--smoke`: the round case (or `--case sweep`) on the `tiny` preset with tiny random models built on the
fly (the same folders for both sides), 4 prompts × 2 samples × 16 tokens, one round; opd's rollout
engine is transformers unless `--opd-engine` says otherwise (the rollout benchmark's smoke already
starts vLLM), TRL's vLLM probe is skipped; `--smoke-skip-trl` leaves TRL out. Figures mean nothing.

Cases (each prints one JSON object with the environment):
  round  opd: `opd init RUN --config smollm2 --set ...`, then `opd rollout|score|train RUN --round 0`, each a
         fresh process (or `opd run RUN --rounds 1` once it exists). TRL: `trl.DistillationTrainer` in a fresh
         process (a string model/teacher path, its own loading, on-policy generation with transformers, teacher
         online, full-vocabulary generalized JSD, `save_model` at the end). Wall clock of everything, process
         start and model loading included. TRL's vLLM colocate mode is tried once first (`trl_vllm_error` when
         it fails; its time is not in `trl_s`). `--repeats R` runs both R times, alternating which goes
         first, and reports each side's lower median (R = 2: the faster of two; every wall is in
         `opd_s_all` / `trl_s_all`).
  sweep  6 training settings, λ ∈ {0, 1} × β ∈ {0, 0.5, 1} at the base lr. opd: one rollout with
         rollout.offpolicy_rows = "both" (every prompt: its n samples and its reference row) and one teacher
         pass, then one `opd sweep RUN --round 0 --grid train.lmbda=0,1 --grid train.beta=0,0.5,1 --set
         train.beta_offpolicy=-1 --eval none` process (no teacher). TRL: GKDTrainer (trl.experimental.gkd:
         λ, β; full-vocabulary JSD against the online teacher) once per setting, same prompts, rows
         (λ = 1: n per prompt, sampled on-policy; λ = 0: the reference once per prompt), completion length
         and optimizer steps, each samples and runs the teacher again (no cache to re-train from).
         Figures: ratio_sweep = TRL's wall ÷ opd's (its rollout + score included); ratio_ceiling = TRL's
         mean seconds per setting ÷ opd's learner-only seconds per setting (train_s: the optimizer steps,
         no start-up, load or export): what the ratio tends to with many settings; overhead_per_setting =
         opd's wall seconds per setting inside the sweep (folder, load, steps, export: the "sweep" line of
         each setting's metrics.jsonl) ÷ its learner-only seconds.
  demo   `opd demo --out DIR` wall time, the held-out reverse KL per round (DIR/rounds/R/heldout/eval.json) and the
         stage times of round 0 (DIR/rounds/0000/metrics.jsonl).

TRL's optimizer steps are matched to opd's: opd's learner plans token-budgeted micro-batches
(train.max_tokens_per_batch), which gives S steps over the round's 2P samples; TRL then trains with
per_device_train_batch_size = 2P / S (gradient_accumulation_steps 1, one generation per step), every prompt
listed n = 2 times in its dataset because DistillationTrainer samples one completion per row. TRL's other
settings are its fastest on this CPU: no gradient checkpointing (its default is on), no
dataloader workers, no pinned memory, no checkpoints, no reporting, no progress bar, and vLLM hidden from its
process in the transformers-generation runs (TRL imports vLLM whenever it is installed, ~4 s, unused there).
The machine's 1-minute load average before and after each case is in the record: on a shared CPU a
concurrent job slows whichever side it overlaps, so compare figures taken at a similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common
from _e2e_common import (
    _DTYPE,
    _PRECISION,
    STAGES,
    _env,
    _error_line,
    _loop_walls,
    _metrics,
    _not_implemented,
    _opd,
    _r,
    _sh,
    _stage_seconds,
    _stage_startup,
    _train_summary,
)
from _e2e_opd import Opd
from _e2e_trl import Trl, _batch_for_steps, trl_gkd_worker, trl_worker


def resolve_precision(args) -> None:
    """`--precision auto` → "bf16" or "fp32" as opd.stages.devices resolves dtype "auto" on this CPU
    (`args.precision` becomes the resolved one, `args.precision_requested` keeps what was asked)."""
    args.precision_requested = args.precision
    pl = _common.resolve("cpu", "auto" if args.precision == "auto" else _DTYPE[args.precision])
    args.precision, args.dtype_reason = _PRECISION[pl.dtype_name], pl.reason


# ------------------------------------------------------------------------------------------ cases


def case_round(args, opd: Opd, trl: Trl, state: dict) -> dict:
    """`args.repeats` × (opd round, TRL round), alternating which goes first; medians reported."""
    opd_runs, trl_runs = [], []  # (wall, details)
    vllm_error, vllm_s, vllm_probe_s = None, None, None
    batch = None
    for i in range(args.repeats):
        for side in ("opd", "trl") if i % 2 == 0 else ("trl", "opd"):
            if side == "opd":
                walls = opd.round(with_train=True, tag=f"-{i}")
                opd_runs.append((sum(walls.values()), {"walls": walls, "run": opd.base, "records": _metrics(opd.base)}))
                if batch is None:  # TRL's step count follows opd's micro-batch plan
                    summary = _train_summary(opd_runs[0][1]["records"])
                    steps = int(summary.get("steps", 1))
                    samples = int(summary.get("samples", args.prompts * args.n))
                    batch = _batch_for_steps(samples, steps)
                    state.update(steps=steps, batch=batch)
                    if trl is not None and not args.skip_trl_vllm:
                        probe = trl.run(batch, args.beta, args.lr, use_vllm=True, timeout=args.trl_vllm_timeout)
                        vllm_error, vllm_probe_s = probe.get("error"), probe["wall_s"]
                        vllm_s = probe["wall_s"] if probe["rc"] == 0 else None
            elif trl is not None:
                res = trl.run(batch, args.beta, args.lr)
                trl_runs.append((res["wall_s"], res))

    def median(runs):
        ranked = sorted(runs, key=lambda x: x[0])
        return ranked[(len(ranked) - 1) // 2]  # the lower median: an actual run, whose details are reported

    opd_s, o = median(opd_runs)
    trl_s, res = median(trl_runs) if trl_runs else (None, {})
    walls, records = o["walls"], o["records"]
    opd.base, opd.base_stage_s = o["run"], walls  # the sweep re-trains from the median run's cache
    summary = _train_summary(records)
    best_trl = min(trl_s, vllm_s) if vllm_s and trl_s else trl_s
    if "run" in walls:  # `opd run`: its own per-stage walls (process start included)
        stage_s = {s: _r(w) for s, w in _loop_walls(records).items()}
        stage_s["run_total"] = _r(walls["run"])
    else:
        stage_s = {s: _r(walls[s]) for s in STAGES}
    return {
        "bench": "e2e",
        "case": "round",
        "opd_s": _r(opd_s),
        "trl_s": _r(trl_s),
        "ratio_round": _r(best_trl / opd_s, 3) if best_trl else None,
        "opd_s_all": [_r(w) for w, _ in opd_runs],
        "trl_s_all": [_r(w) for w, _ in trl_runs],
        "opd_stage_s": stage_s,
        "opd_init_s": _r(walls["init"]),
        "opd_stage_inprocess_s": _stage_seconds(records),
        "opd_stage_startup_s": _stage_startup(records),
        "opd_cmd": "opd run --rounds 1" if opd.use_run else "opd init + opd rollout/score/train (fresh processes)",
        "opd_engine": next((r.get("engine") for r in records if r.get("stage") == "rollout"), None),
        "samples": int(summary.get("samples", 0)),
        "completion_tokens": int(summary.get("completion_tokens", 0)),
        "opd_steps": state["steps"],
        "opd_first_loss": _r(summary.get("first_loss"), 4),
        "opd_last_loss": _r(summary.get("last_loss"), 4),
        "trl_generation": "transformers",
        "precision": args.precision,
        "trl_vllm_error": vllm_error,
        "trl_vllm_s": _r(vllm_s),
        "trl_vllm_probe_s": _r(vllm_probe_s),
        "trl_vllm_hidden": True,
        "trl_steps": res.get("steps"),
        "trl_batch_size": batch,
        "trl_samples": res.get("completions"),
        "trl_completion_tokens": res.get("completion_tokens"),
        "trl_breakdown_s": {k: res.get(k) for k in ("import_s", "init_s", "train_s", "gen_s", "save_s")},
        "trl_first_loss": _r(res.get("first_loss"), 4),
        "trl_last_loss": _r(res.get("last_loss"), 4),
        "repeats": args.repeats,
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "lmbda": 1.0,
        "beta": args.beta,
        "lr": args.lr,
        "top_k_cache": next((r.get("top_k") for r in records if r.get("stage") == "score"), None),
        **_env(),
    }


SWEEP_GRID = {"lmbda": [0.0, 1.0], "beta": [0.0, 0.5, 1.0]}  # 6 settings, one learning rate


def case_sweep(args, opd: Opd, trl: Trl, state: dict) -> dict:
    """opd: one rollout with both kinds of rows per prompt + one teacher pass, then one `opd sweep`
    process of the 6 λ × β settings (no teacher); TRL: GKDTrainer once per setting (each samples and
    runs the teacher again). Three figures: ratio_sweep (wall ÷ wall), ratio_ceiling (TRL seconds per
    setting ÷ opd learner-only seconds per setting) and overhead_per_setting (opd's wall per setting
    inside the sweep ÷ its learner-only seconds)."""
    walls = opd.round(with_train=False, tag="-sweep", both=True)
    shared_s = sum(walls[k] for k in ("init", "rollout", "score"))
    grid = {"lmbda": [0.0, 1.0], "beta": [1.0]} if args.smoke else SWEEP_GRID  # smoke: 2 settings, plumbing only
    sweep_s, settings = opd.sweep(grid)
    trl_runs = []
    for st in settings:
        steps = int(st["summary"].get("steps", 1))
        rows = args.prompts * (1 if st["lmbda"] == 0 else args.n)
        res = (
            trl.run(_batch_for_steps(rows, steps), st["beta"], args.lr, lmbda=st["lmbda"])
            if trl is not None
            else {"wall_s": None}
        )
        trl_runs.append(res)
    learner = [float(st["summary"].get("train_s") or 0.0) for st in settings]
    inside = [float(st["inside"].get("wall_s") or 0.0) for st in settings]
    trl_walls = [r["wall_s"] for r in trl_runs]
    trl_s = sum(trl_walls) if trl is not None else None
    opd_s = shared_s + sweep_s
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "bench": "e2e",
        "case": "sweep",
        "settings_count": len(settings),
        "opd_s": _r(opd_s),
        "opd_rollout_score_s": _r(shared_s),
        "opd_sweep_process_s": _r(sweep_s),
        "trl_s": _r(trl_s),
        "ratio_sweep": _r(trl_s / opd_s, 3) if trl_s else None,
        "ratio_ceiling": _r(mean(trl_walls) / mean(learner), 3) if trl_s and mean(learner) else None,
        "overhead_per_setting": _r(mean(inside) / mean(learner), 3) if mean(learner) else None,
        "overhead_per_setting_with_process_start": _r(sweep_s / len(settings) / mean(learner), 3)
        if mean(learner)
        else None,
        "settings": [
            {
                "lmbda": st["lmbda"],
                "beta": st["beta"],
                "opd_samples": st["summary"].get("samples"),
                "opd_steps": st["summary"].get("steps"),
                "opd_learner_s": _r(lr_s),
                "opd_inside_sweep_s": _r(w),
                "opd_last_loss": _r(st["summary"].get("last_loss"), 4),
                "trl_s": _r(r.get("wall_s")),
                "trl_steps": r.get("steps"),
                "trl_rows": r.get("rows"),
                "trl_breakdown_s": {k: r.get(k) for k in ("import_s", "init_s", "train_s", "save_s")},
                "trl_last_loss": _r(r.get("last_loss"), 4),
                "trl_error": r.get("error"),
            }
            for st, lr_s, w, r in zip(settings, learner, inside, trl_runs)
        ],
        "opd_stage_s": {k: _r(v) for k, v in walls.items()},
        "trl_trainer": "trl.experimental.gkd.GKDTrainer",
        "trl_generation": "transformers",
        "precision": args.precision,
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "lr": args.lr,
        **_env(),
    }


def case_demo(args, root: Path) -> dict:
    out = root / "opd-demo"
    if _not_implemented("demo"):
        return {
            "bench": "e2e",
            "case": "demo",
            "error": "`opd demo` is not yet implemented in this version of opd",
            **_env(),
        }
    wall, rc, tail = _sh(_opd("demo", "--out", str(out)), root / "logs" / "opd-demo.log", check=False)
    if rc != 0:
        return {"bench": "e2e", "case": "demo", "error": _error_line(tail, rc), "wall_s": _r(wall), **_env()}
    rounds = sorted(p for p in (out / "rounds").glob("[0-9][0-9][0-9][0-9]") if p.is_dir())
    evals = []
    for p in rounds:
        f = p / "heldout" / "eval.json"
        if f.is_file():
            e = json.loads(f.read_text())
            evals.append(
                {"round": int(p.name), **{k: e.get(k) for k in ("heldout_rkl", "accuracy", "samples", "tokens")}}
            )
    return {
        "bench": "e2e",
        "case": "demo",
        "wall_s": _r(wall),
        "rounds": len(rounds),
        "heldout_rkl_by_round": [_r(e["heldout_rkl"], 4) if e["heldout_rkl"] is not None else None for e in evals],
        "accuracy_by_round": [e["accuracy"] for e in evals],
        "heldout": evals,
        "stage_s_round0": _stage_seconds(_metrics(out, 0)),
        **_env(),
    }


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=["round", "sweep", "demo", "all"], default="round")
    ap.add_argument("--quick", action="store_true", help="16 prompts instead of 32 (round: a few minutes on 2 cores)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts P (default 32, 16 with --quick)")
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=1.0, help="β of the round case (1 = reverse KL)")
    ap.add_argument("--lr", type=float, default=5e-5, help="base learning rate (the smollm2 preset's)")
    ap.add_argument(
        "--opd-engine",
        choices=["auto", "vllm", "transformers"],
        default=None,
        help="opd's rollout engine (default auto = vLLM where it imports, the preset's default; "
        "transformers with --smoke)",
    )
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="both sides: auto (bf16 where this CPU runs it natively, else fp32: opd.stages.devices), "
        "bf16 (bf16 autocast learner, bf16 teacher: 2-3× faster than fp32 on a CPU with "
        "avx512_bf16, far slower without) or fp32",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="round case: opd and TRL rounds each this many times, alternating order; medians",
    )
    ap.add_argument("--skip-trl-vllm", action="store_true", help="do not try TRL's vLLM colocate mode first")
    ap.add_argument("--trl-vllm-timeout", type=float, default=300.0)
    ap.add_argument("--workdir", default=None, help="folder for the runs (default: a fresh temporary folder, kept)")
    ap.add_argument("--skip-trl", action="store_true", help="opd side only (TRL's figures are null)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="about a minute: the round case on the tiny preset, tiny random models built on the fly, "
        "4 prompts × 2 × 16 tokens (figures meaningless)",
    )
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    ap.add_argument("--trl-gkd-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _common.offline()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return
    if args.trl_gkd_worker:
        trl_gkd_worker(args.trl_gkd_worker)
        return
    if args.smoke:
        if args.case not in ("round", "sweep"):
            ap.error("--smoke runs the round or the sweep case (the demo case is the demo preset's real models)")
        args.skip_trl_vllm = True
        args.prompts = args.prompts or 4
        args.max_new_tokens = min(args.max_new_tokens, 16)
    if args.opd_engine is None:  # a smoke run leaves vLLM to the rollout benchmark's smoke
        args.opd_engine = "transformers" if args.smoke else "auto"
    args.prompts = args.prompts or (16 if args.quick else 32)
    resolve_precision(args)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="opd-bench-e2e-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    print(f"# workdir {root}", file=sys.stderr, flush=True)
    args.smoke_models = _common.tiny_models(root / "models") if args.smoke else None
    cases = ["round", "sweep", "demo"] if args.case == "all" else [args.case]
    state: dict = {}
    opd = Opd(args, root) if {"round", "sweep"} & set(cases) else None
    trl = Trl(args, root) if {"round", "sweep"} & set(cases) and not args.skip_trl else None
    for case in cases:
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        if case == "round":
            record = case_round(args, opd, trl, state)
        elif case == "sweep":
            record = case_sweep(args, opd, trl, state)
        else:
            record = case_demo(args, root)
        record["case_wall_s"] = _r(time.perf_counter() - t0, 1)
        record["loadavg_1m_before_after"] = [_r(load0, 2), _r(os.getloadavg()[0], 2)]
        record["workdir"] = str(root)
        record.update(
            dtype=_DTYPE[args.precision],
            dtype_requested=args.precision_requested,
            dtype_reason=args.dtype_reason,
            smoke=args.smoke,
        )
        print(json.dumps(record), flush=True)
    if args.smoke and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
