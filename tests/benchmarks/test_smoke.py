"""The benchmark scripts still run: each one's `--smoke` mode (tiny random models, offline, seconds), as a
subprocess from the repository root, must exit 0 and print the JSON lines a real run prints, with figures
that are possible: finite, positive where they count or time something, within bounds that follow from
what is measured (the cache format's bytes per position, a codec's quantisation step, a distribution's
entropy and top-k mass, sample and token counts from the smoke settings). Nothing is compared with a
measured figure: smoke figures mean nothing beyond that.

The tiny models are built once per session (tests/conftest.py) and handed to the scripts that take a
model (`--model`: bench_cache, bench_rollout, bench_score); the others build theirs in seconds.
vLLM starts twice here (bench_rollout.py, and bench_score.py --engine both; the e2e smoke uses opd's
transformers engine). `benchmarks/gpu_check.py` is run too: without CUDA it must say so in one line and
exit 0; with CUDA it runs every check (a few minutes) and must pass.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd.cache.codec import LOGPROB_STEPS

ROOT = Path(__file__).resolve().parents[2]
HAS_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# every benchmark line records the precision it ran in and the machine's bf16 capability
MACHINE = {"dtype", "dtype_requested", "dtype_reason", "cpu_model", "cpu_native_bf16", "cpu_bf16_caps", "smoke"}
DTYPES = {"float32", "bfloat16", "float16"}

# Bounds. A model's tokens/s: the brief's plausibility band (no CPU forward, sampling or learner step of
# even a tiny model is anywhere near 10 million tokens a second). A codec's positions/s: a position is
# k ids and k log-probs packed or unpacked, well over a nanosecond.
MAX_MODEL_TOKENS_PER_S = 1e7
MAX_CODEC_POSITIONS_PER_S = 1e9
# a Parquet file's fixed part (footer, schema, opd's metadata JSON, page headers, sample ids): spread
# over the smoke's few hundred positions it adds at most this many bytes per file
FILE_OVERHEAD_BYTES = 64 * 1024
# a score shard stores two float32 per position exactly (the taken token's log-prob and the tail): about
# 23 random mantissa bits each, which zstd cannot squeeze below 2 bytes a position
MIN_BYTES_PER_POSITION = 2.0
# the e2e smoke runs a dozen fresh processes (opd's stages, TRL's trainers): on 2 cores shared with other
# jobs a case has taken over 400 s; this only stops a hung one
E2E_HANG_S = 900


def _run(args: list[str], tmp_path: Path, timeout: float = 300) -> tuple[list[dict], subprocess.CompletedProcess]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OPD_HOME=str(tmp_path / "opd_home"),
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
    )
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-5000:]}"
    )
    records = []
    for line in proc.stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # progress lines, TRL's own dict print
        if isinstance(obj, dict):
            records.append(obj)
    return records, proc


def _has(record: dict, keys: set[str]) -> None:
    missing = sorted(keys - set(record))
    assert not missing, f"missing keys {missing} in {record}"


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _between(record: dict, key: str, low: float, high: float, *, low_open: bool = True) -> None:
    """record[key] is a finite number in (low, high) (or [low, high) with low_open=False)."""
    x = record[key]
    ok = _num(x) and (x > low if low_open else x >= low) and x < high
    assert ok, f"{key} = {x!r} outside {'(' if low_open else '['}{low}, {high}) in {record}"


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        _between(record, key, 0, math.inf)


def _rate(record: dict, *keys: str) -> None:
    for key in keys:
        _between(record, key, 0, MAX_MODEL_TOKENS_PER_S)


def _machine(record: dict) -> None:
    """The precision fields: a dtype torch has, and the bf16 capability as booleans."""
    assert record["dtype"] in DTYPES and record["smoke"] is True, record
    assert isinstance(record["cpu_native_bf16"], bool) and all(
        isinstance(v, bool) for v in record["cpu_bf16_caps"].values()
    )


def _score_bytes_high(k: int, bits: int, vocab: int, positions: int, naive: bool = False) -> float:
    """The most a score file can hold per position: its columns uncompressed (+5% for zstd frames on
    incompressible data) and the file's fixed part. opd: k ids of 2 or 4 bytes (cache/codec.py), k
    log-probs of `bits`, the float32 taken and tail log-probs; naive: int32 ids, float32 log-probs."""
    id_bytes = 4 if naive else (2 if vocab <= 65536 else 4)
    raw = k * (id_bytes + bits / 8) + 2 * 4
    return 1.05 * raw + FILE_OVERHEAD_BYTES / positions


@pytest.fixture(scope="session")
def tiny(tiny_teacher, tiny_student) -> dict:
    """The session's tiny models (built once, tests/conftest.py) and their vocabulary size."""
    vocab = json.loads((Path(tiny_teacher) / "config.json").read_text())["vocab_size"]
    return {"teacher": str(tiny_teacher), "student": str(tiny_student), "vocab": vocab}


def test_bench_cache_smoke(tmp_path, tiny):
    records, _ = _run(["benchmarks/bench_cache.py", "--smoke", "--model", tiny["teacher"]], tmp_path)
    lines = [r for r in records if r.get("bench") == "cache"]
    assert {r["encoding"] for r in lines} == {"opd-delta-q8", "opd-delta-q16", "naive-int32-float32"}
    bits_of = {"opd-delta-q8": 8, "opd-delta-q16": 16, "naive-int32-float32": 32}
    size = {}
    for r in lines:
        _has(
            r,
            MACHINE
            | {
                "k",
                "vocab",
                "positions",
                "bytes_per_token",
                "mean_kl",
                "max_abs_logprob_err",
                "frac_below_logprob_floor",
                "encode_tokens_per_s",
                "decode_tokens_per_s",
                "source",
            },
        )
        _machine(r)
        bits, k = bits_of[r["encoding"]], r["k"]
        assert r["vocab"] == tiny["vocab"] and 1 <= k <= r["vocab"] and r["positions"] > 0
        high = _score_bytes_high(k, bits, r["vocab"], r["positions"], naive=bits == 32)
        _between(r, "bytes_per_token", MIN_BYTES_PER_POSITION, high)
        size[r["encoding"], k] = r["bytes_per_token"]
        # above the floor a code is within half a step (cache/codec.py); float32 is stored exactly
        _between(r, "max_abs_logprob_err", 0, LOGPROB_STEPS[bits] / 2 + 1e-6, low_open=False)
        # each of the k+1 bucket log-probs moves by <= step/2, so by <= step after renormalising: KL <= step
        # (+ what the entries below the floor, each of mass < e^-15.9, can add)
        _between(r, "mean_kl", -1e-9, LOGPROB_STEPS[bits] + 1e-4, low_open=False)
        _between(r, "frac_below_logprob_floor", 0, 1, low_open=False)
        if bits == 32:
            assert r["frac_below_logprob_floor"] == 0  # no floor
        for key in ("encode_tokens_per_s", "decode_tokens_per_s"):
            _between(r, key, 0, MAX_CODEC_POSITIONS_PER_S)
    for k in {k for _, k in size}:  # the same ids and log-probs in fewer bits take fewer bytes
        assert size["opd-delta-q8", k] <= size["opd-delta-q16", k] < size["naive-int32-float32", k], size


def test_bench_rollout_smoke(tmp_path, tiny):
    records, _ = _run(["benchmarks/bench_rollout.py", "--smoke", "--model", tiny["student"]], tmp_path)
    engines = [r for r in records if r.get("bench") == "rollout" and "engine" in r]
    assert {r["engine"] for r in engines} == ({"vllm", "transformers"} if HAS_VLLM else {"transformers"})
    for r in engines:
        _has(
            r,
            MACHINE
            | {
                "model",
                "prompts",
                "n",
                "max_new_tokens",
                "completion_tokens",
                "tokens_per_s",
                "startup_s",
                "seconds",
                "logprobs_finite",
            },
        )
        _machine(r)
        assert (r["prompts"], r["n"], r["max_new_tokens"]) == (4, 2, 16)  # the smoke's settings
        # every sample has at most max_new_tokens; a random model rarely stops at once on all 8
        _between(r, "completion_tokens", 0, r["prompts"] * r["n"] * r["max_new_tokens"] + 1)
        _rate(r, "tokens_per_s")
        _positive(r, "seconds")
        _between(r, "startup_s", 0, math.inf, low_open=r["engine"] == "vllm")  # rounded to 0.1 s
        assert r["logprobs_finite"] is True
    assert len({r["dtype"] for r in engines}) == 1  # both engines in the same resolved dtype
    if HAS_VLLM:
        ratio = [r for r in records if "ratio_vllm_over_transformers" in r]
        assert len(ratio) == 1 and ratio[0]["dtype"] == engines[0]["dtype"]
        by = {r["engine"]: r["tokens_per_s"] for r in engines}
        assert ratio[0]["ratio_vllm_over_transformers"] == pytest.approx(by["vllm"] / by["transformers"], abs=0.006)


def test_bench_score_smoke(tmp_path, tiny):
    records, _ = _run(["benchmarks/bench_score.py", "--smoke", "--model", tiny["teacher"]], tmp_path)
    lines = [r for r in records if r.get("bench") == "score"]
    assert lines
    for r in lines:
        _has(
            r,
            MACHINE
            | {
                "k",
                "samples",
                "positions",
                "input_tokens",
                "opd_tokens_per_s",
                "bare_forward_tokens_per_s",
                "ratio",
                "ratio_cpu",
                "pair_ratios",
                "bytes_per_token",
                "mean_topk_mass",
                "mean_entropy",
                "stage_dtype",
                "device",
            },
        )
        _machine(r)
        assert r["stage_dtype"] == r["dtype"]
        k, V = r["k"], tiny["vocab"]
        assert r["samples"] == 6 and 0 < r["positions"] <= r["input_tokens"]  # fed: prompt + completion - 1
        _rate(r, "opd_tokens_per_s", "bare_forward_tokens_per_s")
        # opd's loop is the bare forward and more: a median pair ratio far above 1 is not a measurement
        _between(r, "ratio", 0, 10)
        _between(r, "ratio_cpu", 0, 10)
        assert len(r["pair_ratios"]) == r["repeats"] * r["shards"] and all(_num(x) and x > 0 for x in r["pair_ratios"])
        _between(r, "bytes_per_token", MIN_BYTES_PER_POSITION, _score_bytes_high(k, 8, V, r["positions"]))
        # the k most likely of V tokens hold at least k/V of the mass; the entropy is at most log V
        _between(r, "mean_topk_mass", k / V - 1e-6, 1 + 1e-6)
        _between(r, "mean_entropy", 0, math.log(V) + 1e-6)


@pytest.mark.skipif(not HAS_VLLM, reason="the engine comparison needs vLLM")
def test_bench_score_engines_smoke(tmp_path, tiny):
    """--engine both: one line per engine variant (the same rollouts) and the ratio line."""
    args = ["benchmarks/bench_score.py", "--smoke", "--engine", "both", "--per-prompt", "4", "--model", tiny["teacher"]]
    records, _ = _run(args, tmp_path)
    variants = {r["engine"]: r for r in records if r.get("bench") == "score" and "engine" in r}
    assert set(variants) == {"transformers", "vllm", "vllm_no_prefix_cache"}
    for r in variants.values():
        _has(r, MACHINE | {"tokens_per_s", "input_tokens", "per_prompt", "walls_s", "load_s"})
        _machine(r)
        assert r["input_tokens"] == variants["transformers"]["input_tokens"] and r["per_prompt"] == 4
        assert 0 < r["positions"] <= r["input_tokens"] and r["samples"] == 6 * 4
        _rate(r, "tokens_per_s")
        assert len(r["walls_s"]) == r["repeats"] and all(_num(w) and w > 0 for w in r["walls_s"])
        _between(r, "load_s", 0, math.inf, low_open=False)  # rounded to 0.1 s
    assert {"prefix_cached_tokens", "rescored_without_prefix_cache"} <= set(variants["vllm"])
    for name in ("vllm", "vllm_no_prefix_cache"):
        _between(variants[name], "prefix_cached_tokens", 0, variants[name]["input_tokens"] + 1, low_open=False)
    (ratio,) = [r for r in records if "ratio_vllm_over_transformers" in r]
    tps = {name: r["tokens_per_s"] for name, r in variants.items()}
    assert ratio["ratio_vllm_over_transformers"] == pytest.approx(tps["vllm"] / tps["transformers"], abs=0.0006)
    assert ratio["ratio_vllm_prefix_cache_on_over_off"] == pytest.approx(
        tps["vllm"] / tps["vllm_no_prefix_cache"], abs=0.0006
    )
    assert ratio["ratio_vllm_prefix_cache_on_over_off"] > 0


def test_bench_train_smoke(tmp_path, tiny):
    # float32 on every CPU: the variants' first losses are compared at float32 tolerances below (in bf16 the
    # compiled layers round differently, ~2e-4 on the real model)
    args = ["benchmarks/bench_train.py", "--smoke", "--dtype", "float32", *([] if HAS_TRL else ["--skip-trl"])]
    records, _ = _run(args, tmp_path)
    lines = [r for r in records if r.get("bench") == "train"]
    assert len(lines) == 1
    r = lines[0]
    variants = {"opd", "opd_unfused", "opd_ckpt", "opd_compile", "ce", "ce_unfused"}
    _has(
        r,
        MACHINE
        | {
            "tokens",
            "tokens_per_s",
            "ratio_vs_ce",
            "ratio_vs_ce_unfused",
            "fused_speedup",
            "ckpt_step_ratio",
            "ckpt_peak_ratio",
            "compile_step_ratio",
            "compile_s",
            "trl_tokens_per_s",
            "ratio_vs_trl",
            "peak_mem_ratio_vs_ce",
            "loss_step_kb_per_token",
            "projected_8b_16k_gb",
            "step_s",
            "first_loss",
            "device",
            "wall_s",
        },
    )
    _machine(r)
    assert r["device"] == "cpu" and r["steps_timed"] == 2 and r["samples"] == 8  # the smoke's settings
    assert r["dtype"] == "float32"
    assert set(r["tokens_per_s"]) == set(r["step_s"]) == set(r["loss_step_peak_mb"]) == variants
    _positive(r, "tokens", "ratio_vs_ce", "fused_speedup", "ckpt_step_ratio", "compile_step_ratio", "wall_s")
    for v in variants:
        assert 0 < r["tokens_per_s"][v] < MAX_MODEL_TOKENS_PER_S, v
    steps_of = dict(r["step_s"], **({"trl": r["trl_step_s"]} if HAS_TRL else {}))
    for key, steps in steps_of.items():  # two warm-up steps, then the timed ones; each rounded to 1 ms
        assert len(steps) == r["steps_timed"] + 2 and all(_num(s) and s >= 0 for s in steps), (key, steps)
    if HAS_TRL:
        _rate(r, "trl_tokens_per_s")
        _positive(r, "ratio_vs_trl")
    # a step adds activations and gradients on top of the loaded model: a positive number of bytes each
    _positive(r, "peak_mem_ratio_vs_ce", "ckpt_peak_ratio")
    assert all(r["loss_step_peak_mb"][v] > 0 and r["loss_step_kb_per_token"][v] > 0 for v in variants)
    assert set(r["projected_8b_16k_gb"]) == {"opd", "opd_ckpt"} and all(
        g > 0 for g in r["projected_8b_16k_gb"].values()
    )
    # the same first micro-batch and weights: checkpointing and compiling change no loss; the fused head
    # gives the unfused one's loss (float tolerance of a random tiny student's step)
    first = r["first_loss"]
    assert r["ckpt_first_loss_diff"] <= 1e-5 and r["compile_first_loss_diff"] <= 1e-4
    assert first["opd"] == pytest.approx(first["opd_unfused"], abs=1e-4)
    assert first["ce"] == pytest.approx(first["ce_unfused"], abs=1e-4)
    # a divergence is >= 0; cross-entropy of near-uniform logits is about log V, far below 2 log V
    assert first["opd"] >= 0 and 0 < first["ce"] < 2 * math.log(tiny["vocab"])
    assert sum(r["micro_batch_rows"]) <= r["samples"] and all(n >= 1 for n in r["micro_batch_rows"])
    assert all(0 < p <= r["max_tokens_per_batch"] for p in r["padded_tokens_per_step"])


def _e2e_common(rec: dict) -> None:
    """What both e2e cases share: the smoke's sizes, walls that add up, the precision fields."""
    _machine(rec)
    assert (rec["prompts"], rec["n"], rec["max_new_tokens"]) == (4, 2, 16)
    assert (
        rec["precision"] in ("bf16", "fp32")
        and rec["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[rec["precision"]]
    )
    _positive(rec, "opd_s", "case_wall_s")
    if HAS_TRL:
        _positive(rec, "trl_s")
        # the case's wall holds both sides (rounded: opd_s, trl_s to 0.01 s, case_wall_s to 0.1 s)
        assert rec["case_wall_s"] >= rec["opd_s"] + rec["trl_s"] - 0.06, rec
    else:
        assert rec["trl_s"] is None and rec["case_wall_s"] >= rec["opd_s"] - 0.06


def test_bench_e2e_smoke(tmp_path):
    args = ["benchmarks/bench_e2e.py", "--smoke", "--workdir", str(tmp_path / "work")]
    records, _ = _run(args + ([] if HAS_TRL else ["--skip-trl"]), tmp_path, timeout=E2E_HANG_S)
    lines = [r for r in records if r.get("bench") == "e2e" and r.get("case") == "round"]
    assert len(lines) == 1
    rec = lines[0]
    _has(
        rec,
        MACHINE
        | {
            "opd_s",
            "trl_s",
            "ratio_round",
            "opd_stage_s",
            "opd_cmd",
            "opd_engine",
            "samples",
            "completion_tokens",
            "opd_steps",
            "opd_first_loss",
            "trl_steps",
            "precision",
            "case_wall_s",
            "prompts",
            "n",
            "max_new_tokens",
        },
    )
    _e2e_common(rec)
    assert rec["opd_engine"] == "transformers"  # the smoke leaves vLLM to bench_rollout's smoke
    assert rec["samples"] == rec["prompts"] * rec["n"]  # λ = 1: every prompt's n samples, on-policy
    _between(rec, "completion_tokens", 0, rec["samples"] * rec["max_new_tokens"] + 1)
    assert rec["opd_steps"] >= 1 and all(_num(s) and s > 0 for s in rec["opd_stage_s"].values()), rec["opd_stage_s"]
    # each stage's own record of its time (metrics.jsonl): every stage ran, so each took some time
    inproc = rec["opd_stage_inprocess_s"]
    assert set(inproc) == {"rollout", "score", "train"} and all(_num(s) and s > 0 for s in inproc.values()), inproc
    startup = rec["opd_stage_startup_s"]  # each stage process: start → first work, of which loading
    assert set(startup) == {"rollout", "score", "train"}, startup
    assert all(0 < s["load"] < s["startup"] for s in startup.values()), startup
    _between(rec, "opd_first_loss", 0, math.inf, low_open=False)  # a divergence
    if HAS_TRL:
        assert rec["trl_steps"] >= 1 and rec["trl_samples"] == rec["samples"]  # TRL samples n per prompt too
        assert rec["ratio_round"] == pytest.approx(rec["trl_s"] / rec["opd_s"], rel=0.01)


def test_gpu_check(tmp_path):
    import torch

    if torch.cuda.is_available():
        records, _ = _run(["benchmarks/gpu_check.py"], tmp_path, timeout=600)
        summary = [r for r in records if r.get("path") == "summary"]
        assert summary and summary[0]["ok"], [r for r in records if not r.get("ok")]
        checks = [r for r in records if r.get("path") not in ("summary", "score_vllm")]
        assert summary[0]["checks"] == len(checks)
        assert all(_num(r["seconds"]) and r["seconds"] >= 0 for r in checks if "seconds" in r)
        return
    records, _ = _run(["benchmarks/gpu_check.py"], tmp_path, timeout=120)
    assert len(records) == 1
    assert records[0]["path"] == "cuda" and records[0]["skipped"] is True and records[0]["ok"] is False
    assert "no CUDA" in records[0]["reason"] and records[0]["torch"] == torch.__version__


def test_bench_e2e_sweep_smoke(tmp_path):
    """The sweep case end to end on tiny models: one rollout with both kinds of rows, one score, one
    `opd sweep` process of 2 settings (λ = 0 and 1), TRL's GKDTrainer once per setting."""
    args = ["benchmarks/bench_e2e.py", "--smoke", "--case", "sweep", "--workdir", str(tmp_path / "work")]
    records, _ = _run(args + ([] if HAS_TRL else ["--skip-trl"]), tmp_path, timeout=E2E_HANG_S)
    lines = [r for r in records if r.get("bench") == "e2e" and r.get("case") == "sweep"]
    assert len(lines) == 1
    rec = lines[0]
    _has(rec, MACHINE | {"opd_s", "trl_s", "ratio_sweep", "ratio_ceiling", "overhead_per_setting", "settings"})
    _e2e_common(rec)
    assert rec["settings_count"] == 2 and [s["lmbda"] for s in rec["settings"]] == [0.0, 1.0]
    assert all(s["opd_learner_s"] > 0 and s["opd_inside_sweep_s"] >= s["opd_learner_s"] for s in rec["settings"])
    assert all(s["opd_steps"] >= 1 for s in rec["settings"])
    assert rec["overhead_per_setting"] >= 1.0
    # one process for every setting: its wall is at least the settings' walls inside it (rounded to 0.01 s)
    _positive(rec, "opd_rollout_score_s", "opd_sweep_process_s")
    assert rec["opd_sweep_process_s"] >= sum(s["opd_inside_sweep_s"] for s in rec["settings"]) - 0.02
    if HAS_TRL:
        _positive(rec, "ratio_sweep", "ratio_ceiling")
        assert all(s["trl_error"] is None and s["trl_s"] > 0 and s["trl_steps"] >= 1 for s in rec["settings"])
        # λ = 0: one reference row per prompt, as opd trains on; λ = 1: n rows per prompt, sampled on-policy
        assert rec["settings"][0]["trl_rows"] == rec["settings"][0]["opd_samples"] == rec["prompts"]
        assert rec["settings"][1]["trl_rows"] == rec["prompts"] * rec["n"]


def test_bench_quant_grids(tmp_path):
    """bench_quant.py's grid check (with torchao's rows where it is installed; its `--smoke`, the whole INT4 benchmark on tiny models, takes 3.5
    minutes here, more than the suite can spend; the INT4 path it runs is tests/cache/test_quant.py's and
    test_loop.py's): opd's grid against torchao's IntxFakeQuantizer, every kind, both figures."""
    records, _ = _run(["benchmarks/bench_quant.py", "--grids"], tmp_path, timeout=120)
    lines = [r for r in records if r.get("bench") == "quant_grids"]
    assert len(lines) == 1
    grids = lines[0]["grids"]
    kinds = [f"int{b}_{k}" for b in (4, 8) for k in ("sym", "asym")]
    sides = ("opd", "torchao") if importlib.util.find_spec("torchao") else ("opd",)  # torchao: optional
    assert set(grids) == {f"{side}_{kind}" for side in sides for kind in kinds}
    for kind in kinds:  # opd's grids are fixed points to within 1 ulp, at a few % relative error
        g = grids[f"opd_{kind}"]
        assert _num(g["requantise_max_move"]) and 0 <= g["requantise_max_move"] < 1e-6
        # a grid of 2^bits levels loses something (> 0) and, at 4 or 8 bits per group, less than 10%
        assert _num(g["rel_error"]) and 0 < g["rel_error"] < 0.1
        if "torchao" in sides:  # torchao's QAT quantiser is not
            assert grids[f"torchao_{kind}"]["requantise_max_move"] > 1e-6


def test_bench_code_smoke(tmp_path):
    """bench_code.py: the repository's own figures, against what can be counted here independently."""
    log = tmp_path / "suite.txt"
    log.write_text(
        "....s.F\n= short test summary info =\n====== 1 failed, 5 passed, 1 skipped in 12.50s (0:00:12) ======\n"
    )
    records, _ = _run(["benchmarks/bench_code.py", "--smoke", "--suite-log", str(log)], tmp_path, timeout=120)
    (rec,) = [r for r in records if r.get("bench") == "code"]
    assert rec["smoke"] is True
    for rel, n in rec["stage_lines"].items():
        path = ROOT / rel
        assert n == (len(path.read_bytes().splitlines()) if path.is_file() else None), rel
    assert rec["stage_lines"]["stages/rollout.py"] > 0 and rec["stage_lines"]["stages/score.py"] > 0
    for folder, best in rec["longest_function"].items():
        assert best["file"].startswith(folder + "/") and (ROOT / best["file"]).is_file()
        assert 1 <= best["lines"] <= len((ROOT / best["file"]).read_text().splitlines())
    for f in rec["files_over_450"]:
        assert f["lines"] > 450 and f["lines"] == len((ROOT / f["file"]).read_bytes().splitlines())
    many = rec["many_params"]
    assert many["count"] == len(many["functions"]) and all(int(x.rsplit(":", 1)[1]) > 6 for x in many["functions"])
    ruff = rec["ruff"]
    assert isinstance(ruff["check_clean"], bool) and isinstance(ruff["format_clean"], bool)
    assert ruff["check_clean"] == (ruff["check_violations"] == 0)
    assert ruff["format_clean"] == (ruff["format_would_reformat"] == 0)
    cpu = rec["cpu"]
    if cpu["source"] == "lscpu":
        assert cpu["model"] and all(isinstance(cpu[f], bool) for f in ("avx512_bf16", "amx_bf16", "avx2"))
    suite = rec["suite"]
    assert (suite["passed"], suite["failed"], suite["skipped"], suite["tests"], suite["wall_s"]) == (5, 1, 1, 7, 12.5)


def test_bench_head_loss_smoke(tmp_path):
    """The fused head + loss against the unfused one: both timed and measured, the same loss and gradients."""
    records, _ = _run(["benchmarks/bench_head_loss.py", "--smoke"], tmp_path)
    (r,) = [r for r in records if r.get("bench") == "head_loss"]
    _has(r, MACHINE | {"fused_s", "unfused_s", "time_ratio", "fused_peak_mb", "unfused_peak_mb", "peak_ratio"})
    assert (r["vocab"], r["positions"]) == (4096, 256) and len(r["fused_s_all"]) == len(r["unfused_s_all"]) == 2
    _positive(r, "fused_s", "unfused_s", "time_ratio", "fused_peak_mb", "unfused_peak_mb", "peak_ratio")
    assert r["time_ratio"] == pytest.approx(r["fused_s"] / r["unfused_s"], abs=0.002)
    # the fused pass keeps one [chunk, V] buffer, the unfused one logits and their recomputation: less memory
    assert r["peak_ratio"] < 1
    assert r["loss_abs_diff"] <= 1e-3 and r["grad_hidden_max_rel_diff"] <= 1e-5 and r["grad_head_max_rel_diff"] <= 1e-5
