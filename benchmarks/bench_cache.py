"""Cache format benchmark: bytes per scored token, fidelity and codec speed, for k in 8..128.

Real teacher distributions: SmolLM2-135M-Instruct (made offline by `opd:smollm2-135m`) scores real
text, GSM8K answers after their questions (chat template), passed as an argument:

    python benchmarks/bench_cache.py --text ../shared/data/gsm8k_train.jsonl --quick

Prints one JSON object per (encoding, k): the opd codec at 8 and 16 log-prob bits, and the naive
baseline (int32 ids + float32 log-probs as Parquet lists, zstd). `bytes_per_token` is the whole
score-shard file (every column, exact taken-token log-prob, tail, Parquet overhead) ÷ positions;
`mean_kl` is the mean over positions of KL(exact ‖ decoded) on the (k+1)-bucket distribution.

The teacher runs on the CPU in `--dtype` (default "auto", as the presets' score.dtype: bf16 only where
this CPU runs it natively, opd.stages.devices); its log-softmax is taken in float32. Each line records
the resolved dtype, the CPU model and whether torch reports native bf16.

    python benchmarks/bench_cache.py --smoke     # seconds: a tiny random teacher, the packaged tiny prompts
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import _common
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from opd.cache.shards import ScoreShard, ScoreShardWriter

KS = (8, 16, 32, 64, 128)


def teacher_distributions(
    text_path: str, samples: int, field_q: str, field_a: str, model_ref: str, dtype: torch.dtype = torch.float32
):
    """Per sample: full-vocab log-probs at each answer position [T, V] and the taken ids [T]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.stages.models import resolve_model

    model_dir = resolve_model(model_ref)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rows = [json.loads(line) for line, _ in zip(open(text_path), range(samples))]
    out = []
    with torch.inference_mode():
        for row in rows:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": row[field_q]}], add_generation_prompt=True, tokenize=False
            )
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tok(row[field_a] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + a_ids])
            logits = model(ids).logits[0, len(p_ids) - 1 : -1].float()
            out.append((torch.log_softmax(logits, -1), torch.tensor(a_ids)))
    return out, model.config.vocab_size, os.path.basename(str(model_dir))


def exact_topk(dists, k):
    """Exact per-sample arrays: topk ids/logprobs [T, k], taken [T], tail [T] (log mass outside top-k)."""
    res = []
    for lp_TV, taken_ids_T in dists:
        sorted_lp, sorted_ids = torch.sort(lp_TV, dim=-1, descending=True)
        tail = (
            torch.logsumexp(sorted_lp[:, k:], dim=-1)
            if k < lp_TV.shape[1]
            else torch.full((lp_TV.shape[0],), -float("inf"))
        )
        taken = lp_TV.gather(1, taken_ids_T[:, None])[:, 0]
        res.append((sorted_ids[:, :k].numpy(), sorted_lp[:, :k].numpy(), taken.numpy(), tail.numpy()))
    return res


def write_opd(rows, path, vocab, k, bits):
    w = ScoreShardWriter(vocab, k, logprob_bits=bits)
    for i, (ids, lps, taken, tail) in enumerate(rows):
        w.add(f"s{i}", ids, lps, taken, tail)
    w.write(pafs.LocalFileSystem(), path, {"bench": True})


def read_opd(path):
    shard = ScoreShard(pafs.LocalFileSystem(), path)
    return [(s.topk_ids_TK, s.topk_logprobs_TK, s.taken_logprobs_T, s.tail_logprobs_T) for s in shard]


def write_naive(rows, path, vocab, k, bits):
    table = pa.table(
        {
            "sample_id": [f"s{i}" for i in range(len(rows))],
            "topk_ids": pa.array([r[0].astype(np.int32).reshape(-1) for r in rows], pa.list_(pa.int32())),
            "topk_logprobs": pa.array([r[1].astype(np.float32).reshape(-1) for r in rows], pa.list_(pa.float32())),
            "taken_logprobs": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
            "tail_logprobs": pa.array([r[3] for r in rows], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, path, compression="zstd")


def read_naive(path):
    t = pq.read_table(path)
    out = []
    for i in range(t.num_rows):
        ids = t["topk_ids"][i].values.to_numpy()
        k = len(ids) // len(t["taken_logprobs"][i])
        out.append(
            (
                ids.reshape(-1, k),
                t["topk_logprobs"][i].values.to_numpy().reshape(-1, k),
                t["taken_logprobs"][i].values.to_numpy(),
                t["tail_logprobs"][i].values.to_numpy(),
            )
        )
    return out


def fidelity(exact, decoded, floor):
    """(mean KL(exact‖decoded) on k+1 buckets, max |logprob err| above the floor, fraction below floor)."""
    kls, max_err, below, total = [], 0.0, 0, 0
    for (e_ids, e_lps, _, e_tail), (d_ids, d_lps, d_taken, d_tail) in zip(exact, decoded):
        order = np.argsort(e_ids, axis=1)
        e_ids_s = np.take_along_axis(e_ids, order, 1)
        e_lps_s = np.take_along_axis(e_lps, order, 1).astype(np.float64)
        d_order = np.argsort(d_ids, axis=1)
        d_ids_s = np.take_along_axis(d_ids, d_order, 1)
        d_lps_s = np.take_along_axis(d_lps, d_order, 1).astype(np.float64)
        assert np.array_equal(e_ids_s, d_ids_s), "ids must round-trip exactly"
        ok = e_lps_s >= floor
        below += int((~ok).sum())
        total += ok.size
        if ok.any():
            max_err = max(max_err, float(np.abs(e_lps_s - d_lps_s)[ok].max()))
        p = np.concatenate([np.exp(e_lps_s), np.exp(e_tail.astype(np.float64))[:, None]], 1)
        q = np.concatenate([np.exp(d_lps_s), np.exp(d_tail.astype(np.float64))[:, None]], 1)
        p /= p.sum(1, keepdims=True)
        q /= q.sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(1)
        kls.append(kl)
    return float(np.concatenate(kls).mean()), max_err, below / max(total, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", help="JSONL with real text, e.g. ../shared/data/gsm8k_train.jsonl")
    ap.add_argument("--question-field", default="question")
    ap.add_argument("--answer-field", default="answer")
    ap.add_argument(
        "--model",
        default=None,
        help="teacher (folder or opd: name; default opd:smollm2-135m, with --smoke a tiny random one built on the fly)",
    )
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="16 samples (under 2 minutes here)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="teacher dtype; auto = bf16 only where this CPU runs it natively, else float32",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: a tiny random teacher built on the fly, the packaged tiny prompts (figures meaningless)",
    )
    args = ap.parse_args()
    if args.smoke:
        args.text = args.text or str(_common.tiny_prompts())
        args.question_field, args.answer_field, args.repeats = "prompt", "reference", 1
    elif not args.text:
        ap.error("--text is required (or --smoke)")
    _common.offline()
    samples = 4 if args.smoke else 16 if args.quick else args.samples
    torch.manual_seed(0)
    pl = _common.resolve("cpu", args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke and args.model is None:
            args.model = str(_common.tiny_models(os.path.join(tmp, "models"))[0])
        args.model = args.model or "opd:smollm2-135m"
        dists, vocab, model_name = teacher_distributions(
            args.text, samples, args.question_field, args.answer_field, args.model, pl.dtype
        )
        positions = sum(d[0].shape[0] for d in dists)
        env = {
            **_common.machine(),
            "device": "cpu",
            "pyarrow": pa.__version__,
            **_common.dtype_record(args.dtype, pl),
            "smoke": args.smoke,
        }
        source = f"{model_name} on {os.path.basename(args.text)} {args.answer_field} ({samples} samples)"
        encodings = [
            ("opd-delta-q8", write_opd, read_opd, 8),
            ("opd-delta-q16", write_opd, read_opd, 16),
            ("naive-int32-float32", write_naive, read_naive, 32),
        ]
        for k in KS:
            exact = exact_topk(dists, k)
            for name, write, read, bits in encodings:
                path = os.path.join(tmp, f"{name}-{k}.parquet")
                enc_s = dec_s = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    write(exact, path, vocab, k, bits)
                    enc_s = min(enc_s, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    decoded = read(path)
                    dec_s = min(dec_s, time.perf_counter() - t0)
                floor = {8: -255 / 16, 16: -65535 / 2048, 32: -np.inf}[bits]
                mean_kl, max_err, frac_below = fidelity(exact, decoded, floor)
                print(
                    json.dumps(
                        {
                            "bench": "cache",
                            "encoding": name,
                            "source": source,
                            "vocab": vocab,
                            "k": k,
                            "positions": positions,
                            "bytes_per_token": round(os.path.getsize(path) / positions, 2),
                            "mean_kl": mean_kl,
                            "max_abs_logprob_err": max_err,
                            "frac_below_logprob_floor": frac_below,
                            "encode_tokens_per_s": round(positions / enc_s),
                            "decode_tokens_per_s": round(positions / dec_s),
                            **env,
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
