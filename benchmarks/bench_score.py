"""Score-stage benchmark: opd's teacher scoring against a bare forward pass of the same teacher.

Real model and text: the teacher is SmolLM2-135M-Instruct (`opd:smollm2-135m`, made offline); the
rollouts are GSM8K questions (chat template) with their reference answers as completions, tokenized
by the SmolLM2 tokenizer and written as real rollout shards into a temporary run directory:

    python benchmarks/bench_score.py --data ../shared/data/gsm8k_train.jsonl --quick --threads 1

(`--threads 1`: on a CPU shared with other jobs, two OpenMP threads stall on each other whenever one is
descheduled, which makes every timing erratic; one thread per side gives stable, comparable figures.)

First `opd.stages.score.run` scores every shard end to end (the score shards it writes give
`bytes_per_token` = shard bytes on disk ÷ scored completion positions). Then, per repeat and per
rollout shard, interleaved (opd, bare, then bare, opd on the next repeat), so that the load of a
shared machine hits both alike:
  opd    the stage's own scoring loop on that shard, with the teacher already loaded: read the rollout
         shard, batch by length, forward, extract top-k / taken / tail / entropy on the device, pack
         and write the score shard (packing overlaps the next forward; the shard's final write is
         timed in full, as nothing follows it)
  bare   the same teacher on the same padded batches (made by the stage's batching code),
         `model(input_ids)` alone, the logits dropped
A repeat's time for one side is its sum over the shards; `opd_tokens_per_s` and
`bare_forward_tokens_per_s` use the median repeat; `ratio` (opd throughput ÷ bare-forward throughput)
is the median over every (repeat, shard) pair of bare time ÷ opd time, the figure a fluctuating
machine load disturbs least (the pairs run back to back); `pair_ratios` lists them all.
`ratio_cpu` is the same median computed from the process's CPU time (all threads, the background
writer included) instead of wall time: on a machine shared with other jobs, waiting for a core
inflates wall time at random, CPU time much less.
Tokens per second count the tokens fed to the teacher (prompt + completion minus its last token,
unpadded), the same for both.
Precision: `--dtype auto` (the default, as the presets): bf16 only where this CPU/GPU runs it natively
(opd.stages.devices), else float32; both sides use the teacher the stage loads, in that dtype. Each line
records the resolved dtype, the CPU model and whether torch reports native bf16 on it.

    python benchmarks/bench_score.py --smoke     # seconds: tiny random teacher, the packaged tiny prompts

Prints one JSON object per k.

Engines (`--engine vllm|both`): the score stage's loop with the transformers scorer and the vLLM scorer
(stages/scorer_vllm.py) on the same rollouts, one process, transformers first; vLLM with and without
reading its prefix cache (reset before each pass), so prefix sharing is measured:

    python benchmarks/bench_score.py --data ../shared/data/gsm8k_train.jsonl --engine both --per-prompt 4 \
        --samples 64 --shards 4 --repeats 3

Prints one JSON object per engine variant ("transformers", "vllm", "vllm_no_prefix_cache") and, for
both, one with "ratio_vllm_over_transformers" and "ratio_vllm_prefix_cache_on_over_off".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import _common
import torch

from opd.cache.rundir import RunDir, finalize_stage, parquet_rows
from opd.cache.shards import read_rollout_shard, write_rollout_shard
from opd.configs.schema import OpdConfig, RolloutConfig, RunConfig, ScoreConfig, dumps_config, load_run_config
from opd.stages import score, score_inputs, score_shards
from opd.stages.models import resolve_model
from opd.stages.runner import Progress
from opd.stages.scorer_hf import batch_arrays, plan_batches


def write_rollouts(
    run: RunDir, tok, data: str, samples: int, shards: int, q_field: str, a_field: str, per_prompt: int = 1
) -> None:
    """GSM8K questions (teacher chat template) + reference answers as completions, as real rollout shards
    (`per_prompt` samples of each prompt, adjacent, never split across shards)."""
    rows = _common.gsm8k_rows(
        tok,
        data,
        samples,
        q_field,
        a_field,
        source="dataset",
        finish_reason="reference",
        tag=b"reference",
        per_prompt=per_prompt,
    )
    per = -(-len(rows) // shards // per_prompt) * per_prompt
    parts = [rows[i : i + per] for i in range(0, len(rows), per)]
    for s, part in enumerate(parts):
        write_rollout_shard(
            run.fs, run.shard_path(0, "rollouts", s), part, producer={"stage": "rollout", "bench": True}
        )
    finalize_stage(
        run,
        run.stage_dir(0, "rollouts"),
        stage="rollouts",
        round_index=0,
        num_shards=len(parts),
        producer={"stage": "rollout", "bench": True},
        row_count=lambda p: parquet_rows(run, p),
    )


def bare_batches(run: RunDir, cfg: OpdConfig, tok, vocab_size: int, shard: int) -> list[torch.Tensor]:
    """The padded input_ids the stage feeds the teacher for one shard, batch by batch (its batching code)."""
    path = run.shard_path(0, "rollouts", shard)
    table, _ = read_rollout_shard(run.fs, path)
    seqs = score_inputs.sequences(table, path, score_inputs.TeacherPrompt.of(cfg), tok, vocab_size)
    lengths = [q.input_ids.size if q.completion.size else 0 for q in seqs]
    return [batch_arrays(seqs, rows)[0] for rows in plan_batches(lengths, cfg.score.max_tokens_per_batch)]


@torch.inference_mode()
def time_bare(model, batches: list[torch.Tensor], device: str) -> float:
    """`model(input_ids)` on each batch, nothing kept."""
    t0 = time.perf_counter()
    for ids in batches:
        out = model(input_ids=ids, use_cache=False)
        del out
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class StageShards:
    """The score stage's own work on one shard, as its runner drives it (stages/score.py's split object,
    the teacher already loaded): `score(shards)` reads each rollout shard, scores it, packs and writes its
    score shard (packing and writing in the stage's background thread), and returns the tokens scored."""

    def __init__(self, cfg: OpdConfig, run: RunDir, teacher: "score.Teacher"):
        self.stage = score._ScoreSplit(cfg, run, 0, "train", teacher, follow=False)
        self.entries = {s: self.stage.entries[s] for s in self.stage.units().numbers}
        self.stage.prepare(sorted(self.entries))
        self.progress = Progress("score")  # no bar: nothing grows it

    def score(self, shards: list[int]) -> int:
        self.stage.totals = score_shards.Totals()
        outcomes = [self.stage.work(s, self.progress) for s in shards]
        return sum(f.result().tokens for f in outcomes)

    @property
    def positions(self) -> int:
        return self.stage.totals.positions

    def close(self) -> None:
        self.stage.__exit__(None, None, None)


def compare_engines(args, model_dir, tok, tmp: str, env: dict) -> None:
    """--engine vllm|both: the stage's own scoring loop (read, score, pack, write every shard, teacher
    loaded) with each engine on the same rollouts, n = --per-prompt samples per prompt. transformers is
    measured first: vLLM's CPU worker cuts torch to its own thread binding for the rest of the process.
    vLLM runs twice per repeat, reading its prefix cache and not (the cache is reset before each), so
    what prefix sharing gains is measured, not assumed."""
    k = args.k[0]
    engines = ["transformers", "vllm"] if args.engine == "both" else [args.engine]
    settings = dict(
        top_k=k,
        max_tokens_per_batch=args.max_tokens_per_batch,
        dtype=args.dtype,
        tokens_per_call=args.tokens_per_call,
        kv_block_size=args.kv_block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    run = RunDir(Path(tmp) / "run-engines")
    run.fs.create_dir(run.root, recursive=True)
    configs = {
        e: OpdConfig(
            run=RunConfig(student=str(model_dir), teacher=str(model_dir)),
            rollout=RolloutConfig(prompts=args.data),
            score=ScoreConfig(engine=e, **settings),
        )
        for e in engines
    }
    with open(run.config_path, "w") as f:
        f.write(dumps_config(configs[engines[0]]))
    write_rollouts(
        run, tok, args.data, args.samples, args.shards, args.question_field, args.answer_field, args.per_prompt
    )
    results = {}
    for engine in engines:
        teacher = score.Teacher(configs[engine], None)
        t0 = time.perf_counter()
        scorer = teacher.scorer()
        load_s = time.perf_counter() - t0
        shards = StageShards(configs[engine], run, teacher)
        entries = shards.entries
        shards.score([0])  # warm-up
        variants = {"vllm": True, "vllm_no_prefix_cache": False} if engine == "vllm" else {"transformers": None}
        walls: dict[str, list[float]] = {v: [] for v in variants}
        counters: dict[str, dict] = {}
        tokens = positions = 0
        for r in range(args.repeats):
            for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                if variants[name] is not None:
                    scorer.prefix_caching = variants[name]
                    scorer.llm.reset_prefix_cache()  # no head start from the previous repeat
                before = dict(scorer.counters)
                t0 = time.perf_counter()
                tokens = shards.score(sorted(entries))
                walls[name].append(time.perf_counter() - t0)
                positions = shards.positions
                counters[name] = {c: v - before.get(c, 0) for c, v in scorer.counters.items()}
        threads = torch.get_num_threads()
        shards.close()
        teacher.release()
        for name, w in walls.items():
            wall = statistics.median(w)
            results[name] = round(tokens / wall, 1)
            print(
                json.dumps(
                    {
                        "bench": "score",
                        "engine": name,
                        "model": os.path.basename(str(model_dir)),
                        "k": k,
                        "samples": sum(e.rows for e in entries.values()),
                        "per_prompt": args.per_prompt,
                        "input_tokens": tokens,
                        "positions": positions,
                        "shards": len(entries),
                        "repeats": args.repeats,
                        "tokens_per_s": results[name],
                        "walls_s": [round(x, 3) for x in w],
                        "load_s": round(load_s, 1),
                        "torch_threads": threads,
                        "kv_block_size": args.kv_block_size,
                        **counters.get(name, {}),
                        **env,
                    }
                ),
                flush=True,
            )
    if "vllm" in results and "transformers" in results:
        print(
            json.dumps(
                {
                    "bench": "score",
                    "ratio_vllm_over_transformers": round(results["vllm"] / results["transformers"], 3),
                    "ratio_vllm_prefix_cache_on_over_off": round(results["vllm"] / results["vllm_no_prefix_cache"], 3),
                    "per_prompt": args.per_prompt,
                    "dtype": env.get("dtype"),
                    "cpu_model": env.get("cpu_model"),
                }
            ),
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="JSONL with questions and answers, e.g. ../shared/data/gsm8k_train.jsonl")
    ap.add_argument("--question-field", default="question")
    ap.add_argument("--answer-field", default="answer")
    ap.add_argument(
        "--model",
        default=None,
        help="teacher (folder or opd: name; default opd:smollm2-135m, with --smoke a tiny random one built on the fly)",
    )
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument(
        "--shards", type=int, default=8, help="rollout shards the samples are split into (the unit of interleaving)"
    )
    ap.add_argument("--k", type=int, nargs="+", default=[64], help="top-k values to measure")
    ap.add_argument("--max-tokens-per-batch", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians are reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both sides; 0 = torch's default")
    ap.add_argument("--device", default="auto", help="teacher device: auto (cuda if visible), cpu, cuda, cuda:N")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="teacher dtype (score.dtype); auto = bf16 only where it runs natively, else float32",
    )
    ap.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm", "both"],
        help="transformers: opd's scorer against a bare forward (the default); vllm / both: the stage's "
        "scoring loop per engine on the same rollouts (both: one run, with ratio_vllm_over_transformers)",
    )
    ap.add_argument("--per-prompt", type=int, default=1, help="samples per prompt (engine comparison: >= 4)")
    ap.add_argument("--tokens-per-call", type=int, default=65536, help="score.tokens_per_call (vllm)")
    ap.add_argument("--kv-block-size", type=int, default=0, help="score.kv_block_size (vllm; 0 = vLLM's default)")
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.5,
        help="score.gpu_memory_utilization (vllm; on CPU unused where VLLM_CPU_KVCACHE_SPACE is set, as here: 2 GiB)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="12 samples in 3 shards, 5 repeats, k=64 (a few minutes on 2 CPU cores)"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: a tiny random teacher built on the fly, the packaged tiny prompts (figures meaningless)",
    )
    args = ap.parse_args()
    if args.quick:
        args.samples, args.shards, args.repeats, args.k = 12, 3, 5, [64]
    if args.smoke:
        args.samples, args.shards, args.repeats, args.k = 6 * args.per_prompt, 2, 2, [16]
        args.question_field, args.answer_field = "prompt", "reference"
        args.data = args.data or str(_common.tiny_prompts())
    elif not args.data:
        ap.error("--data is required (or --smoke)")
    _common.offline()

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="opd-bench-score-") as tmp:
        if args.smoke and args.model is None:
            model_dir = _common.tiny_models(tmp)[0]
        else:
            model_dir = resolve_model(args.model or "opd:smollm2-135m")
        tok = AutoTokenizer.from_pretrained(model_dir)
        pl = _common.resolve(args.device, args.dtype, "--device")
        device = pl.device.type
        env = {
            **_common.machine(),
            "device": str(pl.device),
            **_common.dtype_record(args.dtype, pl),
            "smoke": args.smoke,
        }
        if args.engine != "transformers":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            compare_engines(args, model_dir, tok, tmp, env)
            return
        for k in args.k:
            cfg = OpdConfig(
                run=RunConfig(student=str(model_dir), teacher=str(model_dir)),
                rollout=RolloutConfig(prompts=args.data),
                score=ScoreConfig(
                    top_k=k, max_tokens_per_batch=args.max_tokens_per_batch, device=str(pl.device), dtype=args.dtype
                ),
            )
            run = RunDir(Path(tmp) / f"run-k{k}")
            run.fs.create_dir(run.root, recursive=True)
            with open(run.config_path, "w") as f:
                f.write(dumps_config(cfg))
            cfg = load_run_config(run)
            write_rollouts(run, tok, args.data, args.samples, args.shards, args.question_field, args.answer_field)
            # end to end: the shards, their bytes, the stage's figures
            summary = _common.stage_record(score.run(cfg, run, 0))
            shard_bytes = sum(
                run.fs.get_file_info(run.shard_path(0, "scores", s)).size for s in run.existing_shards(0, "scores")
            )
            # the stage's teacher (same loading, device and dtype); the bare side runs the same model object
            teacher = score.Teacher(cfg, None)
            scorer = teacher.scorer()
            model = scorer.model
            shards = StageShards(cfg, run, teacher)
            entries = shards.entries
            batches = {s: [b.to(device) for b in bare_batches(run, cfg, tok, scorer.V, s)] for s in entries}
            time_bare(model, batches[0][:1], device)  # warm-up
            opd_s, bare_s = {s: [] for s in entries}, {s: [] for s in entries}
            opd_cpu, bare_cpu = {s: [] for s in entries}, {s: [] for s in entries}
            for r in range(args.repeats):
                for s in entries:
                    for which in ("opd", "bare") if r % 2 == 0 else ("bare", "opd"):
                        t0, c0 = time.perf_counter(), time.process_time()
                        if which == "opd":
                            shards.score([s])
                        else:
                            time_bare(model, batches[s], device)
                        wall, cpu = (opd_s, opd_cpu) if which == "opd" else (bare_s, bare_cpu)
                        wall[s].append(time.perf_counter() - t0)
                        cpu[s].append(time.process_time() - c0)
            shards.close()
            teacher.release()
            tokens = summary["tokens"]
            opd_t = statistics.median(sum(opd_s[s][r] for s in entries) for r in range(args.repeats))
            bare_t = statistics.median(sum(bare_s[s][r] for s in entries) for r in range(args.repeats))
            pair_ratios = [bare_s[s][r] / opd_s[s][r] for r in range(args.repeats) for s in entries]
            cpu_ratios = [bare_cpu[s][r] / opd_cpu[s][r] for r in range(args.repeats) for s in entries]
            print(
                json.dumps(
                    {
                        "bench": "score",
                        "model": os.path.basename(str(model_dir)),
                        "k": k,
                        "samples": summary["samples"],
                        "positions": summary["positions"],
                        "input_tokens": tokens,
                        "padded_tokens": summary["padded_tokens"],
                        "max_tokens_per_batch": args.max_tokens_per_batch,
                        "batches": sum(len(b) for b in batches.values()),
                        "shards": len(entries),
                        "repeats": args.repeats,
                        "opd_tokens_per_s": round(tokens / opd_t, 1),
                        "bare_forward_tokens_per_s": round(tokens / bare_t, 1),
                        "ratio": round(statistics.median(pair_ratios), 3),
                        "bytes_per_token": round(shard_bytes / summary["positions"], 2),
                        "opd_s": round(opd_t, 2),
                        "bare_s": round(bare_t, 2),
                        "pair_ratios": [round(x, 3) for x in pair_ratios],
                        "ratio_cpu": round(statistics.median(cpu_ratios), 3),
                        "opd_cpu_s": round(sum(map(sum, opd_cpu.values())) / args.repeats, 2),
                        "bare_cpu_s": round(sum(map(sum, bare_cpu.values())) / args.repeats, 2),
                        "cpu_ratios": [round(x, 3) for x in cpu_ratios],
                        "mean_topk_mass": summary["mean_topk_mass"],
                        "mean_entropy": summary["mean_entropy"],
                        "stage_dtype": summary["dtype"],
                        "source": f"{os.path.basename(args.data)} {args.answer_field} ({summary['samples']} samples)",
                        **env,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
