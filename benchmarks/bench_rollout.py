"""Rollout engine benchmark: sampled tokens per second, vLLM vs transformers, same model, same prompts.

Both engines are the rollout stage's own classes (stages/engine_vllm.py, stages/engine_hf.py, built by
`load_engine` as the stage builds them, dtype "auto"), sampling n completions of real GSM8K questions
rendered with the model's chat template, with the sampling log-probs the stage stores:

    python benchmarks/bench_rollout.py ../shared/data/gsm8k_train.jsonl --quick

Prints one JSON object per engine, then the ratio:
    {"bench": "rollout", "engine": "vllm", "model": ..., "prompts": ..., "n": ..., "max_new_tokens": ...,
     "tokens_per_s": ..., ...}
    {"bench": "rollout", "ratio_vllm_over_transformers": ...}
`tokens_per_s` = completion tokens generated ÷ wall time of the timed generate call (after a short
warm-up call; engine start-up is reported separately as `startup_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def _prompts(path: str, count: int, field: str, tokenizer) -> list[list[int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line)[field])
            if len(rows) == count:
                break
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in rows]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _env() -> dict:
    import torch

    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "device": "cuda" if torch.cuda.is_available() else "cpu", "python": platform.python_version()}
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError:
        pass
    return env


def _measure(engine_name: str, model_dir: str, prompts, sampling, seed: int, args) -> dict:
    from opd.stages.engine import Sampling, load_engine

    t0 = time.perf_counter()
    engine = load_engine(engine_name, model_dir, seed=seed, max_model_len=args.max_model_len,
                         gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True)
    startup = time.perf_counter() - t0
    try:
        engine.generate(prompts[:2], Sampling(n=1, max_new_tokens=8), seed=seed)   # warm-up
        t0 = time.perf_counter()
        out = engine.generate(prompts, sampling, seed=seed)
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    tokens = sum(len(c.token_ids) for per_prompt in out for c in per_prompt)
    finite = all(lp > -1e30 for per_prompt in out for c in per_prompt for lp in c.logprobs)
    dtype = "auto (bf16 on CPU)" if engine_name == "vllm" else "auto (fp32 on CPU)"
    return {"bench": "rollout", "engine": engine_name, "model": os.path.basename(model_dir),
            "prompts": len(prompts), "n": sampling.n, "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "completion_tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "startup_s": round(startup, 1), "dtype": dtype, "logprobs_finite": finite, **_env()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompts", help="JSONL prompt file (e.g. ../shared/data/gsm8k_train.jsonl)")
    ap.add_argument("--field", default="question", help="prompt field of the JSONL rows")
    ap.add_argument("--model", default="opd:smollm2-135m", help="model reference (folder, opd:..., tiny:...)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--engines", default="vllm,transformers")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true",
                    help="16 prompts × 2 samples × 96 tokens (about 3 minutes on 2 CPU cores)")
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.n, args.max_new_tokens = 16, 2, 96
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from transformers import AutoTokenizer

    from opd.pipeline.models import resolve_model
    from opd.stages.engine import Sampling

    model_dir = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = _prompts(args.prompts, args.num_prompts, args.field, tokenizer)
    args.max_model_len = max(len(p) for p in prompts) + args.max_new_tokens + 16
    sampling = Sampling(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    results = {}
    for name in args.engines.split(","):
        results[name] = _measure(name, model_dir, prompts, sampling, seed=0, args=args)
        print(json.dumps(results[name]), flush=True)
    if "vllm" in results and "transformers" in results:
        ratio = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
        print(json.dumps({"bench": "rollout", "ratio_vllm_over_transformers": round(ratio, 2)}), flush=True)


if __name__ == "__main__":
    main()
