"""The benchmark scripts still run: each one's `--smoke` mode (tiny random models built on the fly,
offline, seconds), as a subprocess from the repository root, must exit 0 and print at least one JSON
line with the keys a real run prints. No figure is checked: smoke figures mean nothing.

vLLM starts twice here (bench_rollout.py, and bench_score.py --engine both; the e2e smoke uses opd's
transformers engine). About 3 minutes
on 2 cores in all. `benchmarks/gpu_check.py` is run too: without CUDA it must say so in one line and exit
0; with CUDA it runs every check (a few minutes) and must pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_TRL = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# every benchmark line records the precision it ran in and the machine's bf16 capability
MACHINE = {"dtype", "dtype_requested", "dtype_reason", "cpu_model", "cpu_native_bf16", "cpu_bf16_caps", "smoke"}


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


def test_bench_cache_smoke(tmp_path):
    records, _ = _run(["benchmarks/bench_cache.py", "--smoke"], tmp_path)
    lines = [r for r in records if r.get("bench") == "cache"]
    assert {r["encoding"] for r in lines} == {"opd-delta-q8", "opd-delta-q16", "naive-int32-float32"}
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


def test_bench_rollout_smoke(tmp_path):
    records, _ = _run(["benchmarks/bench_rollout.py", "--smoke"], tmp_path)
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
    assert len({r["dtype"] for r in engines}) == 1  # both engines in the same resolved dtype
    if HAS_VLLM:
        ratio = [r for r in records if "ratio_vllm_over_transformers" in r]
        assert len(ratio) == 1 and ratio[0]["dtype"] == engines[0]["dtype"]


def test_bench_score_smoke(tmp_path):
    records, _ = _run(["benchmarks/bench_score.py", "--smoke"], tmp_path)
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
        assert r["stage_dtype"] == r["dtype"]


@pytest.mark.skipif(not HAS_VLLM, reason="the engine comparison needs vLLM")
def test_bench_score_engines_smoke(tmp_path):
    """--engine both: one line per engine variant (the same rollouts) and the ratio line."""
    records, _ = _run(["benchmarks/bench_score.py", "--smoke", "--engine", "both", "--per-prompt", "4"], tmp_path)
    variants = {r["engine"]: r for r in records if r.get("bench") == "score" and "engine" in r}
    assert set(variants) == {"transformers", "vllm", "vllm_no_prefix_cache"}
    for r in variants.values():
        _has(r, MACHINE | {"tokens_per_s", "input_tokens", "per_prompt", "walls_s", "load_s"})
        assert r["input_tokens"] == variants["transformers"]["input_tokens"] and r["per_prompt"] == 4
    assert {"prefix_cached_tokens", "rescored_without_prefix_cache"} <= set(variants["vllm"])
    (ratio,) = [r for r in records if "ratio_vllm_over_transformers" in r]
    assert ratio["ratio_vllm_prefix_cache_on_over_off"] > 0


def test_bench_train_smoke(tmp_path):
    records, _ = _run(["benchmarks/bench_train.py", "--smoke", *([] if HAS_TRL else ["--skip-trl"])], tmp_path)
    lines = [r for r in records if r.get("bench") == "train"]
    assert len(lines) == 1
    _has(
        lines[0],
        MACHINE
        | {
            "tokens",
            "opd_tokens_per_s",
            "sft_tokens_per_s",
            "ratio_vs_sft",
            "trl_tokens_per_s",
            "ratio_vs_trl",
            "peak_mem_ratio_vs_ce",
            "opd_step_s",
            "sft_step_s",
            "opd_first_loss",
            "device",
            "wall_s",
        },
    )


def test_bench_e2e_smoke(tmp_path):
    args = ["benchmarks/bench_e2e.py", "--smoke", "--workdir", str(tmp_path / "work")]
    records, _ = _run(args + ([] if HAS_TRL else ["--skip-trl"]), tmp_path, timeout=400)
    lines = [r for r in records if r.get("bench") == "e2e" and r.get("case") == "round"]
    assert len(lines) == 1
    _has(
        lines[0],
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
    if HAS_TRL:
        assert lines[0]["trl_s"] is not None


def test_gpu_check(tmp_path):
    import torch

    if torch.cuda.is_available():
        records, _ = _run(["benchmarks/gpu_check.py"], tmp_path, timeout=600)
        summary = [r for r in records if r.get("path") == "summary"]
        assert summary and summary[0]["ok"], [r for r in records if not r.get("ok")]
        return
    records, _ = _run(["benchmarks/gpu_check.py"], tmp_path, timeout=120)
    assert len(records) == 1
    assert records[0]["path"] == "cuda" and records[0]["skipped"] is True and records[0]["ok"] is False
    assert "no CUDA" in records[0]["reason"]


def test_bench_e2e_sweep_smoke(tmp_path):
    """The sweep case end to end on tiny models: one rollout with both kinds of rows, one score, one
    `opd sweep` process of 2 settings (λ = 0 and 1), TRL's GKDTrainer once per setting."""
    args = ["benchmarks/bench_e2e.py", "--smoke", "--case", "sweep", "--workdir", str(tmp_path / "work")]
    records, _ = _run(args + ([] if HAS_TRL else ["--skip-trl"]), tmp_path, timeout=400)
    lines = [r for r in records if r.get("bench") == "e2e" and r.get("case") == "sweep"]
    assert len(lines) == 1
    rec = lines[0]
    _has(rec, MACHINE | {"opd_s", "trl_s", "ratio_sweep", "ratio_ceiling", "overhead_per_setting", "settings"})
    assert rec["settings_count"] == 2 and [s["lmbda"] for s in rec["settings"]] == [0.0, 1.0]
    assert all(s["opd_learner_s"] > 0 and s["opd_inside_sweep_s"] >= s["opd_learner_s"] for s in rec["settings"])
    assert rec["overhead_per_setting"] >= 1.0
    if HAS_TRL:
        assert rec["ratio_sweep"] > 0 and all(s["trl_error"] is None for s in rec["settings"])
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
        assert grids[f"opd_{kind}"]["requantise_max_move"] < 1e-6 and grids[f"opd_{kind}"]["rel_error"] < 0.1
        if "torchao" in sides:  # torchao's QAT quantiser is not
            assert grids[f"torchao_{kind}"]["requantise_max_move"] > 1e-6
