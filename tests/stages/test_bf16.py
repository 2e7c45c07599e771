"""The bf16 paths, tested on purpose on every CPU (whatever `dtype = "auto"` picks here).

Every other stage test pins float32, because it compares with float32 references. Here each stage runs
in bfloat16 (forced, tiny models) against a reference computed by the same model in bfloat16, with a
tolerance derived from bf16's precision rather than tuned:

    a bf16 number has 8 significant bits, so one rounding of a logit z moves it by at most
    ulp(z)/2 = 2^(floor(log2|z|) - 8); two computations of the same bf16 logits that round differently
    differ by ≤ ulp(max|z|) per logit, and a log-probability z_i/τ − logsumexp(z/τ) then by ≤ 2·ulp/τ.

`OPD_NATIVE_BF16=1` makes "auto" choose as on a CPU with native bf16 (an avx512_bf16 Xeon), so the
choice itself is also tested here.
"""

import math

import numpy as np
import pytest
import torch
from test_rollout import make_run as make_rollout_run
from test_rollout import processed_logprobs, read_rows, write_prompts
from test_score import make_run as make_score_run
from test_score import rollout_rows

from opd.cache.rundir import read_manifest
from opd.cache.shards import ScoreShard
from opd.stages import rollout, score


def bf16_ulp(x: float) -> float:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 2.0**-126))) - 7)


def bf16_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()


def test_auto_is_bf16_where_the_cpu_has_it(monkeypatch, tmp_path, tiny_teacher, tiny_student):
    """dtype "auto" on a CPU with native bf16 (as OPD_NATIVE_BF16=1 reports it) scores in bf16 and says so."""
    monkeypatch.setenv("OPD_NATIVE_BF16", "1")
    run, cfg = make_score_run(tmp_path, tiny_teacher, tiny_student, [rollout_rows(0, 3)], dtype="auto")
    result = score.run(cfg, run, 0)
    assert result.extras.dtype == "bfloat16"
    assert ScoreShard(run.fs, run.shard_path(0, "scores", 0)).meta["producer"]["dtype"] == "bfloat16"
    monkeypatch.setenv("OPD_NATIVE_BF16", "0")
    run, cfg = make_score_run(tmp_path / "f32", tiny_teacher, tiny_student, [rollout_rows(0, 3)], dtype="auto")
    assert score.run(cfg, run, 0).extras.dtype == "float32"


def test_score_in_bf16_matches_a_bf16_forward(tmp_path, tiny_teacher, tiny_student):
    """The cache of a bf16 teacher against that bf16 teacher's own forward on each unpadded sequence
    (one sequence per batch, so the stage computes the same bf16 logits), log-probs kept exactly."""
    tau, K = 0.7, 16
    shards = [rollout_rows(3, 8, completion_len=(1, 20))]
    run, cfg = make_score_run(
        tmp_path, tiny_teacher, tiny_student, shards, dtype="bfloat16", top_k=K, temperature=tau, logprob_bits=32
    )
    cfg = cfg.replace("score", max_tokens_per_batch=1)  # each sequence its own batch: no padding
    result = score.run(cfg, run, 0)
    assert result.extras.dtype == "bfloat16" and result.done
    model = bf16_model(tiny_teacher)
    for row, sample in zip(shards[0], ScoreShard(run.fs, run.shard_path(0, "scores", 0))):
        P, C = row["prompt_ids"], row["completion_ids"]
        with torch.no_grad():
            z = model(torch.tensor([P + C])).logits[0, len(P) - 1 : -1].double()
        logp = torch.log_softmax(z / tau, -1).numpy()
        tol = 2 * bf16_ulp(z.abs().max().item()) / tau + 1e-5  # module docstring; 1e-5: float32 log-softmax
        taken = logp[np.arange(len(C)), C]
        assert np.abs(sample.taken_logprobs_T - taken).max() <= tol
        top = np.take_along_axis(logp, sample.topk_ids_TK.astype(np.int64), 1)
        assert np.abs(sample.topk_logprobs_TK - top).max() <= tol


def test_rollout_in_bf16_log_probs_match_a_bf16_forward(tmp_path, tiny_student, tiny_teacher):
    """The transformers engine sampling in bf16: its log-probs against the bf16 model's full forward
    over prompt + completion. Sampling decodes with a KV cache, the reference recomputes every position:
    each of the model's layers may round its output differently, so the bound is the per-logit one
    (module docstring) once per layer plus once for the head."""
    temperature = 0.8
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    run, cfg = make_rollout_run(
        tmp_path, "run", tiny_student, tiny_teacher, prompts, dtype="bfloat16", temperature=temperature
    )
    result = rollout.run(cfg, run, 0)
    assert result.done and result.samples == 8
    assert read_manifest(run, run.stage_dir(0, "rollouts")).producer["dtype"] == "bfloat16"
    model = bf16_model(tiny_student)
    layers = model.config.num_hidden_layers
    for r in read_rows(run):
        P, C = r["prompt_ids"], r["completion_ids"]
        with torch.no_grad():
            z = model(torch.tensor([P + C])).logits[0, len(P) - 1 : -1].double()
        want = processed_logprobs(z, temperature, -1, 1.0).gather(1, torch.tensor(C)[:, None])[:, 0]
        got = torch.tensor(r["sampling_logprobs"], dtype=torch.float64)
        tol = (layers + 1) * 2 * bf16_ulp(z.abs().max().item()) / temperature + 1e-5
        assert (got - want).abs().max().item() <= tol, (r["sample_id"], (got - want).abs().max().item(), tol)


@pytest.mark.parametrize("x,ulp", [(1.0, 2**-7), (3.0, 2**-6), (0.3, 2**-9), (-12.0, 2**-4)])
def test_bf16_ulp(x, ulp):
    assert bf16_ulp(x) == ulp
    v = torch.tensor(x, dtype=torch.bfloat16)
    assert float(torch.nextafter(v, torch.tensor(math.inf, dtype=torch.bfloat16))) - float(v) == ulp
