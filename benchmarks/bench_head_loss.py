"""The learner's head + loss alone: the fused pass (stages/fused_head.py) against the unfused chunked path
(train.fused_head_loss = false: each chunk's logits, log-softmax pieces and gather under checkpoint,
recomputed in backward), on the same hidden states, head and cache batch:

    python benchmarks/bench_head_loss.py                  # V = 151,936 (Qwen), H = 256, N = 2,048, K = 64
    python benchmarks/bench_head_loss.py --smoke          # seconds, figures meaningless

`--dtype` (default float32) runs both variants under that autocast dtype.

Both variants run `Learner.head_loss` (generalized JSD β = 0.5 on a mixed on/off-policy batch with the
logged metrics) then backward to the hidden states and the head weight; each with the learner's auto
chunk (~512 MiB of float32 logits unfused, ~128 MiB fused). Time: the variants alternate, `--repeats` each after a
warm-up, medians reported. Peak memory: a fresh process per variant (as bench_train.py), what one
forward + backward adds to the resident set after a warm-up, gradients included (the step allocates
them, as the learner's does after `zero_grad(set_to_none=True)`).
Gradients: the largest |Δ| of ∂L/∂h and ∂L/∂W between the variants, relative to the largest gradient.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import _common
import torch
from _train_memory import step_peak

from opd.configs.schema import TrainConfig
from opd.stages import learner as L


def build(args):
    """(learner with the fused path, the same without, hidden [N, H] leaf, batch)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).float()
    model.lm_head.weight.data.normal_(0, 0.02)
    tc = TrainConfig(device="cpu", dtype="float32", beta=0.5, beta_offpolicy=0.0)
    fused = L.Learner(model, tc, head_only=True, top_k=args.top_k)
    unfused = L.Learner(model, dataclasses.replace(tc, fused_head_loss=False), head_only=True, top_k=args.top_k)
    N, K, V = args.positions, args.top_k, args.vocab
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, args.hidden, generator=g).requires_grad_()
    ids, lps = [], []
    for s in range(0, N, 256):  # a peaked random teacher: its top-k ids and log-probs, 256 rows at a time
        t = torch.log_softmax(torch.randn(min(256, N - s), V, generator=g) * 3, -1)
        top = t.topk(K, dim=-1)
        ids.append(top.indices)
        lps.append(top.values)
    lps_NK = torch.cat(lps)
    on = torch.arange(N) % 4 != 0
    batch = {
        "topk_ids_NK": torch.cat(ids).to(torch.int32),
        "topk_logprobs_NK": lps_NK,
        "tail_N": torch.log1p(-lps_NK.exp().sum(-1).clamp(max=1 - 1e-6)),
        "on_policy_N": on,
        "target_N": torch.cat(ids)[:, 0].long(),
        "tokens": N,
        "on_tokens": int(on.sum()),
    }
    return fused, unfused, hidden, batch


def step(learner, hidden, batch):
    hidden.grad = None
    learner.model.lm_head.weight.grad = None
    loss, metrics = learner.head_loss(hidden, batch, need_metrics=True)
    loss.backward()
    return float(loss.detach()), hidden.grad.clone(), learner.model.lm_head.weight.grad.clone()


def memory_of(args, variant: str) -> int:
    """(subprocess) the peak one forward + backward adds, in bytes."""
    env = dict(
        os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS=str(args.threads)
    )
    cmd = [sys.executable, __file__, "--memory-variant", variant, *sys.argv[1:]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"memory subprocess {variant} failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16"],
        help="autocast dtype of both variants (auto = bf16 only where this CPU runs it natively)",
    )
    parser.add_argument("--smoke", action="store_true", help="V = 4,096, N = 256, 2 repeats: seconds")
    parser.add_argument("--memory-variant", choices=["fused", "unfused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _common.offline()
    if args.smoke:
        args.vocab, args.positions, args.repeats = 4096, 256, 2
    placement = _common.resolve("cpu", args.dtype)
    autocast = L.autocast(placement.device, placement.dtype)
    fused, unfused, hidden, batch = build(args)

    def fwd_bwd(learner):
        with autocast():
            return step(learner, hidden, batch)

    if args.memory_variant:
        learner = fused if args.memory_variant == "fused" else unfused
        fwd_bwd(learner)  # warm-up: allocator pools, lazy initialisation
        hidden.grad = learner.model.lm_head.weight.grad = (
            None  # the step allocates its gradients, as the learner's does
        )
        print(step_peak(lambda: fwd_bwd(learner)))
        return

    times = {"fused": [], "unfused": []}
    results = {}
    for i in range(args.repeats + 1):
        pair = (("fused", fused), ("unfused", unfused)) if i % 2 == 0 else (("unfused", unfused), ("fused", fused))
        for name, learner in pair:
            t0 = time.perf_counter()
            results[name] = fwd_bwd(learner)
            if i > 0:  # the first pair is the warm-up
                times[name].append(time.perf_counter() - t0)
    (loss_f, gh_f, gw_f), (loss_u, gh_u, gw_u) = results["fused"], results["unfused"]
    mem = {name: memory_of(args, name) for name in ("fused", "unfused")}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    record = {
        "bench": "head_loss",
        "vocab": args.vocab,
        "hidden": args.hidden,
        "positions": args.positions,
        "top_k": args.top_k,
        "chunk_positions": {"fused": fused.chunk, "unfused": unfused.chunk},
        "loss": "jsd beta=0.5 (off-policy rows beta=0), with metrics",
        "fused_s": round(med["fused"], 4),
        "unfused_s": round(med["unfused"], 4),
        "time_ratio": round(med["fused"] / med["unfused"], 3),
        "fused_peak_mb": round(mem["fused"] / 2**20, 1),
        "unfused_peak_mb": round(mem["unfused"] / 2**20, 1),
        "peak_ratio": round(mem["fused"] / mem["unfused"], 3),
        "loss_abs_diff": abs(loss_f - loss_u),
        "grad_hidden_max_rel_diff": float((gh_f - gh_u).abs().max() / gh_u.abs().max()),
        "grad_head_max_rel_diff": float((gw_f - gw_u).abs().max() / gw_u.abs().max()),
        "fused_s_all": [round(t, 4) for t in times["fused"]],
        "unfused_s_all": [round(t, 4) for t in times["unfused"]],
        **_common.machine(),
        **_common.dtype_record(args.dtype, placement),
        "smoke": args.smoke,
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
