"""Rollout engine benchmark: sampled tokens per second, vLLM vs transformers, same model, same prompts.

Both engines are the rollout stage's own classes (stages/engine_vllm.py, stages/engine_hf.py, built by
`load_engine` as the stage builds them), sampling n completions of real GSM8K questions rendered with
the model's chat template, with the sampling log-probs the stage stores:

    python benchmarks/bench_rollout.py ../shared/data/gsm8k_train.jsonl --quick
    python benchmarks/bench_rollout.py --smoke       # seconds (vLLM start ~20 s): a tiny random model

Precision: `--dtype auto` (the default, as rollout.dtype in the presets) is resolved once, as the stage
resolves it (opd.stages.devices: bf16 only where this CPU/GPU runs it natively, else float32), and the
resolved name is passed explicitly to both engines, so they compute in the same dtype. Each line
records it, the CPU model and whether torch reports native bf16. Where vLLM does not import, only the
transformers engine runs (and no ratio is printed).

Prints one JSON object per engine, then the ratio:
    {"bench": "rollout", "engine": "vllm", "model": ..., "prompts": ..., "n": ..., "max_new_tokens": ...,
     "tokens_per_s": ..., ...}
    {"bench": "rollout", "ratio_vllm_over_transformers": ..., "dtype": ...}
`tokens_per_s` = completion tokens generated ÷ wall time of the timed generate call (after a short
warm-up call; engine start-up is reported separately as `startup_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import _common


def _prompts(path: str, count: int, field: str, tokenizer) -> list[list[int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line)[field])
            if len(rows) == count:
                break
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in rows
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or an install that does not import
        return False
    return True


def _env() -> dict:
    import torch

    env = {**_common.machine(), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError:
        pass
    return env


def _measure(engine_name: str, model_dir: str, prompts, sampling, seed: int, args, pl) -> dict:
    from opd.stages.engine import EngineSpec, Sampling, load_engine

    t0 = time.perf_counter()
    spec = EngineSpec(
        model_dir,
        seed=seed,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=True,
        dtype=pl.dtype_name,
    )  # the same resolved dtype for both engines
    engine = load_engine(engine_name, spec)
    startup = time.perf_counter() - t0
    try:
        engine.generate(prompts[:2], Sampling(n=1, max_new_tokens=8), seed=seed)  # warm-up
        import torch

        torch_threads = torch.get_num_threads()  # while this engine generates
        t0 = time.perf_counter()
        out = engine.generate(prompts, sampling, seed=seed)
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    tokens = sum(len(c.token_ids) for per_prompt in out for c in per_prompt)
    finite = all(lp > -1e30 for per_prompt in out for c in per_prompt for lp in c.logprobs)
    return {
        "bench": "rollout",
        "engine": engine_name,
        "model": os.path.basename(model_dir),
        "prompts": len(prompts),
        "n": sampling.n,
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "startup_s": round(startup, 1),
        "logprobs_finite": finite,
        "torch_threads": torch_threads,
        "smoke": args.smoke,
        **_common.dtype_record(args.dtype, pl),
        **_env(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompts", nargs="?", help="JSONL prompt file (e.g. ../shared/data/gsm8k_train.jsonl)")
    ap.add_argument("--field", default="question", help="prompt field of the JSONL rows")
    ap.add_argument(
        "--model",
        default=None,
        help="model reference (folder, opd:..., tiny:...; default opd:smollm2-135m, with --smoke a tiny random "
        "student built on the fly)",
    )
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument(
        "--engines",
        default=None,
        help="comma-separated (default vllm,transformers; transformers alone where vLLM does not import)",
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="both engines' dtype (rollout.dtype); auto = bf16 only where it runs natively, else float32",
    )
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument(
        "--quick", action="store_true", help="16 prompts × 2 samples × 96 tokens (about 3 minutes on 2 CPU cores)"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: a tiny random model built on the fly, 4 packaged tiny prompts (figures meaningless)",
    )
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.n, args.max_new_tokens = 16, 2, 96
    if args.smoke:
        args.num_prompts, args.n, args.max_new_tokens, args.field = 4, 2, 16, "prompt"
        args.prompts = args.prompts or str(_common.tiny_prompts())
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's engine core in this process
    elif not args.prompts:
        ap.error("the prompts file is required (or --smoke)")
    _common.offline()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from transformers import AutoTokenizer

    from opd.stages.engine import Sampling
    from opd.stages.models import resolve_model

    if args.engines is None:
        # transformers first: vLLM's CPU worker cuts torch to one thread for the rest of the process
        # ("Reducing Torch threads from 2 to 1 for serving"), which would slow an engine measured after it
        args.engines = "transformers,vllm" if _vllm_importable() else "transformers"
    pl = _common.resolve("auto", args.dtype, "rollout")  # as the stage: its device, this dtype
    with tempfile.TemporaryDirectory(prefix="opd-bench-rollout-") as tmp:
        if args.smoke and args.model is None:
            model_dir = str(_common.tiny_models(tmp)[1])
        else:
            model_dir = str(resolve_model(args.model or "opd:smollm2-135m"))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = _prompts(args.prompts, args.num_prompts, args.field, tokenizer)
        args.max_model_len = max(len(p) for p in prompts) + args.max_new_tokens + 16
        sampling = Sampling(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
        results = {}
        for name in args.engines.split(","):
            results[name] = _measure(name, model_dir, prompts, sampling, seed=0, args=args, pl=pl)
            print(json.dumps(results[name]), flush=True)
    if "vllm" in results and "transformers" in results:
        ratio = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
        print(
            json.dumps(
                {
                    "bench": "rollout",
                    "ratio_vllm_over_transformers": round(ratio, 2),
                    "dtype": pl.dtype_name,
                    "smoke": args.smoke,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
