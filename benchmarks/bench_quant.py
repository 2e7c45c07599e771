"""Quantised students: how much of what INT4 post-training quantisation (PTQ) lost does on-policy
distillation from the full-precision model win back?

The `smollm2-int4` recipe: teacher SmolLM2-135M-Instruct in float32, student its INT4 copy (weight-only,
group size 32, round-to-nearest), trained with fake quantisation (train.quantize):

    python benchmarks/bench_quant.py                 # 2 rounds λ=1 β=1, 2 rounds λ=0 β=0, 7 evaluations
    python benchmarks/bench_quant.py --smoke --rounds 1   # the same steps on tiny random models (transformers engine)
    python benchmarks/bench_quant.py --grids              # opd's INT4/INT8 grid against torchao's IntxFakeQuantizer

Rows, every one evaluated the same way on the same held-out prompts (configs/demo_heldout.jsonl):
  teacher               the FP32 model itself
  ptq_rtn_sym           `opd:smollm2-135m-int4` (the recipe's run.student)
  ptq_rtn_asym          the same grid with a zero point per group (`opd models quantize --asymmetric`)
  qat_l1_b1_round1/2    after 1 and 2 rounds of `opd run --config smollm2-int4` (λ = 1, β = 1: on-policy reverse KL)
  qat_l0_b0_round2      after 2 rounds with λ = 0, β = 0 (the dataset's reference answers, forward KL)
Figures per row:
  heldout_rkl    opd's own held-out figure: a fresh run folder with run.student = the row's model, `opd rollout
                 --split heldout` (vLLM, temperature 1, eval.n samples a prompt) and `opd score --split heldout`
                 (the FP32 teacher); the mean over sampled tokens of log p_S(x_t) − log p_T(x_t)
  ref_nll        teacher-forced NLL (nats/token) of the held-out reference answers under the row's model
  topk_overlap   on the same reference positions, |top-k(student) ∩ top-k(teacher)| / k, k = score.top_k
  gap_closed     1 − heldout_rkl / heldout_rkl(ptq_rtn_sym): the share of the PTQ gap closed (the teacher's 0)
`ptq_gap_closed` is gap_closed of qat_l1_b1_round2 (target ≥ 0.5). One JSON line, with the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _opd(*args: str, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ opd {' '.join(args)}\n")
        f.flush()
        rc = subprocess.run(
            [sys.executable, "-m", "opd.pipeline.cli", *args], stdout=f, stderr=subprocess.STDOUT
        ).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"opd {' '.join(args)} exited with {rc}; last output:\n{tail}")
    return time.perf_counter() - t0


def _sets(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]


def heldout_rkl(name: str, model: Path, base: list[str], work: Path, log: Path) -> dict:
    """opd's held-out evaluation of one model, as round 0 of a fresh run folder."""
    from opd.cache.rundir import RunDir
    from opd.pipeline.evaluate import read_eval

    run = work / "eval" / name
    sets = _sets({"run.student": json.dumps(str(model)), "train.quantize": "false"})
    _opd("init", str(run), *base, *sets, log=log)
    t = _opd("rollout", str(run), "--round", "0", "--split", "heldout", log=log)
    t += _opd("score", str(run), "--round", "0", "--split", "heldout", log=log)
    t += _opd("eval", str(run), "--round", "0", log=log)  # the score stage writes no eval.json; `opd eval` does
    ev = read_eval(RunDir(str(run)), 0)
    return {"heldout_rkl": ev["heldout_rkl"], "samples": ev["samples"], "tokens": ev["tokens"], "eval_s": round(t, 1)}


def reference_figures(models: dict[str, Path], teacher: Path, cfg, k: int) -> dict[str, dict]:
    """Teacher-forced NLL of the held-out references and top-k overlap with the teacher, per model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    rows = [json.loads(x) for x in Path(cfg.eval.prompts).read_text().splitlines() if x.strip()]
    rows = rows[: cfg.eval.max_prompts or None]
    batches = []
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        if not isinstance(prompt, list):
            prompt = prompt["input_ids"]
        answer = tok(r["reference"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        batches.append((torch.tensor([prompt + answer]), len(prompt), torch.tensor(answer)))

    def logits_of(path: Path) -> list:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            return [model(ids).logits[0, P - 1 : -1].float() for ids, P, _ in batches]

    teacher_logits = logits_of(teacher)
    out = {}
    for name, path in models.items():
        z_all = teacher_logits if path == teacher else logits_of(path)
        nll, overlap, n = 0.0, 0.0, 0
        for z, zt, (_, _, answer) in zip(z_all, teacher_logits, batches):
            logp = torch.log_softmax(z, -1)
            nll += float(-logp.gather(1, answer[:, None]).sum())
            s_top, t_top = z.topk(k, -1).indices, zt.topk(k, -1).indices
            overlap += float((s_top[:, :, None] == t_top[:, None, :]).any(-1).float().mean(-1).sum())
            n += len(answer)
        out[name] = {"ref_nll": nll / n, "topk_overlap": overlap / n, "ref_tokens": n}
    return out


def grid_check() -> dict:
    """Why opd's grid and not torchao's IntxFakeQuantizer: on N(0.5, 1) weights [256, 512], group 32, the
    relative weight error ‖ŵ − w‖ / ‖w‖ and how far fake-quantising ŵ again moves it (max |fq(ŵ) − ŵ|).
    torchao's rows are there when torchao is installed (`pip install torchao==0.18.0`; opd does not need it)."""
    import torch

    from opd.stages.quant import QuantSpec, fake_quantize

    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    except ImportError:
        IntxFakeQuantizer = None
    torch.manual_seed(0)
    w = torch.randn(256, 512) + 0.5
    out = {}
    for bits, dtype in ((4, getattr(torch, "int4", None)), (8, torch.int8)):
        for symmetric in (True, False):
            kind = f"int{bits}_{'sym' if symmetric else 'asym'}"
            spec = QuantSpec(bits=bits, group_size=32, symmetric=symmetric)
            sides = {"opd": lambda x, spec=spec: fake_quantize(x, spec)}
            if IntxFakeQuantizer is not None:
                sides["torchao"] = IntxFakeQuantizer(
                    IntxFakeQuantizeConfig(dtype, group_size=32, is_symmetric=symmetric)
                )
            for name, fq in sides.items():
                with torch.no_grad():
                    a = fq(w)
                    again = fq(a.clone())
                out[f"{name}_{kind}"] = {
                    "rel_error": round(float((a - w).norm() / w.norm()), 4),
                    "requantise_max_move": float((again - a).abs().max()),
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="folder for the runs (default: a fresh temporary folder, kept)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=8, help="held-out samples per prompt (the recipe's is 4)")
    ap.add_argument("--smoke", action="store_true", help="tiny random models: the code path in ~2 minutes")
    ap.add_argument("--grids", action="store_true", help="only the grid comparison with torchao's quantiser (a second)")
    args = ap.parse_args()
    _common.offline()
    if args.grids:
        print(json.dumps({"bench": "quant_grids", "grids": grid_check(), **_common.machine()}))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="opd-bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench_quant.log"

    from opd.configs.schema import load_config
    from opd.stages.models import quantize, resolve_model
    from opd.stages.quant import QuantSpec

    t0 = time.perf_counter()
    if args.smoke:  # the tiny teacher and its own INT4 copies
        teacher, _ = _common.tiny_models(work / "models")
        ptq_sym = quantize(teacher, work / "models" / "tiny-int4", QuantSpec())
        config = ["--config", "tiny"]
        extra = {
            "run.teacher": json.dumps(str(teacher)),
            "run.student": json.dumps(str(ptq_sym)),
            "train.quantize": "true",
        }
        extra.update({"rollout.max_prompts": 4, "eval.max_prompts": 4, "rollout.max_new_tokens": 16})
        extra["rollout.engine"] = '"transformers"'  # the rollout benchmark's smoke already starts vLLM
        cfg = load_config("tiny")
    else:
        teacher = resolve_model("opd:smollm2-135m")
        ptq_sym = resolve_model("opd:smollm2-135m-int4")
        config, extra = ["--config", "smollm2-int4"], {}
        cfg = load_config("smollm2-int4")
    ptq_asym = quantize(teacher, work / "models" / "int4-asym", QuantSpec(symmetric=False))
    base = [*config, *_sets({**extra, "eval.n": args.eval_n})]
    no_eval = _sets({"eval.prompts": '""'})
    walls = {}
    runs = {
        "l1_b1": {"rollout.lmbda": 1, "train.beta": 1},
        "l0_b0": {"rollout.lmbda": 0, "train.beta": 0, "train.beta_offpolicy": 0},
    }
    for tag, settings in runs.items():
        walls[f"run_{tag}_s"] = round(
            _opd(
                "run",
                str(work / tag),
                *config,
                "--rounds",
                str(args.rounds),
                *_sets(extra),
                *no_eval,
                *_sets(settings),
                log=log,
            ),
            1,
        )
    last = args.rounds - 1
    models = {"teacher": teacher, "ptq_rtn_sym": ptq_sym, "ptq_rtn_asym": ptq_asym}
    for r in range(args.rounds):
        models[f"qat_l1_b1_round{r + 1}"] = work / "l1_b1" / "rounds" / f"{r:04d}" / "student"
    models[f"qat_l0_b0_round{args.rounds}"] = work / "l0_b0" / "rounds" / f"{last:04d}" / "student"
    rows = {name: {"model": str(path)} for name, path in models.items()}
    for name, path in models.items():
        rows[name].update(heldout_rkl(name, path, base, work, log))
    for name, figures in reference_figures(models, teacher, cfg, cfg.score.top_k).items():
        rows[name].update(figures)
    ptq = rows["ptq_rtn_sym"]["heldout_rkl"]
    for row in rows.values():
        row["gap_closed"] = None if ptq <= 0 else 1 - row["heldout_rkl"] / ptq
    on, off = rows[f"qat_l1_b1_round{args.rounds}"], rows[f"qat_l0_b0_round{args.rounds}"]
    record = {
        "bench": "quant",
        "smoke": args.smoke,
        "recipe": "tiny" if args.smoke else "smollm2-int4",
        "rounds": args.rounds,
        "eval_n": args.eval_n,
        "rows": rows,
        "grids": grid_check(),
        "ptq_gap_closed": on["gap_closed"],
        "lambda0_vs_lambda1_rkl_ratio": off["heldout_rkl"] / on["heldout_rkl"] if on["heldout_rkl"] else None,
        **walls,
        "wall_s": round(time.perf_counter() - t0, 1),
        "workdir": str(work),
        **_common.machine(),
        **_common.dtype_record("auto", _common.resolve("cpu", "auto")),
    }
    print(json.dumps(record))
    print("row                 heldout_rkl  gap_closed  ref_nll  topk_overlap", file=sys.stderr)
    for name, row in rows.items():
        gap = "-" if row["gap_closed"] is None else f"{row['gap_closed']:.3f}"
        print(
            f"{name:<20}{row['heldout_rkl']:>11.4f}{gap:>12}{row['ref_nll']:>9.4f}{row['topk_overlap']:>14.4f}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
