"""The score stage (stages/score.py): cached teacher top-k against a direct full-vocabulary forward,
batching invariance, temperature, tail, vocabulary and missing-rollout errors, --shard, kill + resume,
rendering, later rounds, CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from waiting import wait_for

from opd.cache import storage
from opd.cache.errors import FingerprintMismatch, OpdError
from opd.cache.rundir import Manifest, RunDir, ShardSpec, finalize_stage, parquet_rows, read_manifest, write_manifest
from opd.cache.shards import ScoreShard, write_rollout_shard
from opd.configs.schema import OpdConfig, RolloutConfig, RunConfig, ScoreConfig, dumps_config, load_run_config
from opd.pipeline.cli import main
from opd.stages import score

VOCAB = 260  # the tiny models' byte-level tokenizer


# ------------------------------------------------------------------------------------------ helpers


def rollout_rows(seed: int, n: int, prompt_len=(1, 12), completion_len=(0, 20), prefix="q"):
    """Ragged rollout rows with random prompt and completion ids from the tiny vocabulary."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        P = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        T = int(rng.integers(completion_len[0], completion_len[1] + 1))
        rows.append(
            dict(
                sample_id=f"{prefix}{i}/0",
                prompt_id=f"{prefix}{i}",
                sample_index=0,
                source="student",
                prompt_ids=rng.integers(0, VOCAB, P).tolist(),
                completion_ids=rng.integers(0, VOCAB, T).tolist(),
                sampling_logprobs=[-5.0] * T,
                finish_reason="length",
                sampling_hash="h" * 64,
                prompt_messages=None,
            )
        )
    return rows


def make_run(root: Path, teacher, student, shards: list[list[dict]] | None, **score_cfg) -> tuple[RunDir, OpdConfig]:
    """A run folder with opd.toml and (unless `shards` is None) a finished round-0 rollouts stage."""
    cfg = OpdConfig(
        run=RunConfig(student=str(student), teacher=str(teacher)),
        rollout=RolloutConfig(prompts=str(root / "prompts.jsonl")),
        score=ScoreConfig(**{"dtype": "float32", **score_cfg}),  # float32 references; bf16 has its own test
    )
    run = RunDir(root / "run")
    storage.makedirs(run.fs, run.root)
    storage.atomic_write_bytes(run.fs, run.config_path, dumps_config(cfg).encode())
    if shards is not None:
        for s, rows in enumerate(shards):
            write_rollout_shard(run.fs, run.shard_path(0, "rollouts", s), rows, producer={"stage": "rollout"})
        finalize_stage(
            run,
            run.stage_dir(0, "rollouts"),
            stage="rollouts",
            round_index=0,
            num_shards=len(shards),
            producer={"stage": "rollout"},
            row_count=lambda p: parquet_rows(run, p),
        )
    return run, load_run_config(run)


def score_shards(run: RunDir) -> dict[str, tuple]:
    """{shard name: (table, metadata)} of the score shards present."""
    out = {}
    for s in run.existing_shards(0, "scores"):
        sh = ScoreShard(run.fs, run.shard_path(0, "scores", s))
        out[f"part-{s:05d}"] = (sh.table, sh.meta)
    return out


def reference_logp(model, prompt, completion, tau: float) -> torch.Tensor:
    """Full-vocabulary teacher log-probs [T, V] (float64) from a forward on the unpadded sequence."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(completion) - 1] / tau, -1)


def check_against_reference(sample, logp_TV: torch.Tensor, completion, K: int, lp_tol: float, tol: float = 1e-5):
    """Cached top-k, taken and tail of one sample against the exact distributions."""
    T = len(completion)
    assert sample.topk_ids_TK.shape == (T, K) and sample.taken_logprobs_T.shape == (T,)
    lp = logp_TV.numpy()
    for t in range(T):
        ids = sample.topk_ids_TK[t]
        assert len(set(ids.tolist())) == K
        kth = np.sort(lp[t])[-K]
        assert lp[t, ids].min() >= kth - tol, f"position {t}: cached ids are not the top-{K}"
        assert np.abs(sample.topk_logprobs_TK[t] - lp[t, ids]).max() <= lp_tol + tol
        assert abs(sample.taken_logprobs_T[t] - lp[t, completion[t]]) <= tol
        outside = np.ones(lp.shape[1], bool)
        outside[ids] = False
        exact_tail = np.logaddexp.reduce(lp[t, outside])
        assert abs(sample.tail_logprobs_T[t] - exact_tail) <= tol * max(1.0, abs(exact_tail)), (t, exact_tail)


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ correctness


def test_cache_matches_full_vocabulary_forward_at_temperature(tmp_path, tiny_teacher, tiny_student, teacher_model):
    shards = [rollout_rows(0, 9, completion_len=(0, 25)), rollout_rows(1, 7, prompt_len=(1, 3))]
    tau, K = 0.7, 16
    run, cfg = make_run(tmp_path, tiny_teacher, tiny_student, shards, top_k=K, temperature=tau, max_tokens_per_batch=64)
    summary = score.run(cfg, run, 0)

    positions = sum(len(r["completion_ids"]) for rows in shards for r in rows)
    assert summary.extras.positions == positions and summary.shards_written == 2 and summary.done
    entropies, masses = [], []
    for s, rows in enumerate(shards):
        shard = ScoreShard(run.fs, run.shard_path(0, "scores", s))
        assert shard.temperature == tau and shard.meta["top_k"] == K and shard.meta["vocab_size"] == VOCAB
        assert shard.sample_ids == [r["sample_id"] for r in rows]
        for row, sample in zip(rows, shard):
            comp = row["completion_ids"]
            if not comp:
                assert sample.taken_logprobs_T.shape == (0,) and sample.topk_ids_TK.shape == (0, K)
                continue
            logp = reference_logp(teacher_model, row["prompt_ids"], comp, tau)
            check_against_reference(sample, logp, comp, K, lp_tol=1 / 32)
            entropies.append(-(logp.exp() * logp).sum(-1))
            masses.append(logp.topk(K, -1).values.exp().sum(-1))
            if s == 0:  # the temperature is applied: at τ = 1 the taken log-probs are measurably different
                plain = reference_logp(teacher_model, row["prompt_ids"], comp, 1.0)
                assert np.abs(sample.taken_logprobs_T - plain[torch.arange(len(comp)), comp].numpy()).max() > 1e-3
    # the mean entropy is that of the full distribution; the mass is the top-k's
    assert summary.extras.mean_entropy == pytest.approx(float(torch.cat(entropies).mean()), rel=1e-4)
    assert summary.extras.mean_topk_mass == pytest.approx(float(torch.cat(masses).mean()), rel=1e-4)

    # manifest, producer links and metrics
    manifest = read_manifest(run, run.stage_dir(0, "scores"))
    rollouts = read_manifest(run, run.stage_dir(0, "rollouts"))
    assert manifest.summary["positions"] == positions and manifest.summary["temperature"] == tau
    assert 0 < manifest.summary["mean_topk_mass"] < 1 and manifest.summary["mean_entropy"] > 0
    for s, entry in enumerate(rollouts.shards):
        producer = ScoreShard(run.fs, run.shard_path(0, "scores", s)).meta["producer"]
        assert producer["rollout_sha256"] == entry.sha256 and producer["stage"] == "score"
    record = json.loads(Path(run.metrics_path(0)).read_text().splitlines()[-1])
    assert record["stage"] == "score" and record["positions"] == positions
    assert record["bytes_per_token"] == pytest.approx(record["bytes"] / positions, abs=0.01)
    for key in ("mean_topk_mass", "mean_entropy", "seconds", "tokens_per_s"):
        assert record[key] > 0


def test_tail_is_a_logsumexp_when_the_top_k_holds_almost_all_mass(tmp_path, tiny_teacher, tiny_student):
    """A sharp teacher: 1 - Σ top-k underflows in float32, the stored tail must still be exact."""
    from transformers import AutoModelForCausalLM

    sharp = tmp_path / "sharp-teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    model.save_pretrained(sharp)
    for name in os.listdir(tiny_teacher):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(Path(tiny_teacher) / name, sharp / name)
    shards = [rollout_rows(5, 6, completion_len=(3, 12))]
    run, cfg = make_run(tmp_path, sharp, tiny_student, shards, top_k=16, logprob_bits=32)
    score.run(cfg, run, 0)
    shard = ScoreShard(run.fs, run.shard_path(0, "scores", 0))
    exact_tails = []
    for row, sample in zip(shards[0], shard):
        logp = reference_logp(model.eval(), row["prompt_ids"], row["completion_ids"], 1.0)
        check_against_reference(sample, logp, row["completion_ids"], 16, lp_tol=0.0, tol=2e-4)
        exact_tails.append(sample.tail_logprobs_T)
    tails = np.concatenate(exact_tails)
    assert np.isfinite(tails).all() and tails.min() < -25  # log(1 - Σ top-k) would be -inf here


def test_padded_output_rows_are_never_stored(tmp_path, tiny_teacher, tiny_student, teacher_model):
    """A teacher whose output layer has more rows than its tokenizer has tokens (Qwen's 152,064 rows for
    151,669 tokens): the scored vocabulary is the tokenizer's, no stored id reaches the padding, and
    the log-probs are normalised over the real rows, so the student's learner accepts the cache."""
    from transformers import AutoModelForCausalLM

    padded = tmp_path / "padded-teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    model.resize_token_embeddings(VOCAB + 60)
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = model.lm_head.weight[:VOCAB].abs().max() * 3  # padding that would win
    model.save_pretrained(padded)
    for name in os.listdir(tiny_teacher):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(Path(tiny_teacher) / name, padded / name)
    assert model.lm_head.weight.shape[0] == VOCAB + 60
    shards = [rollout_rows(8, 5, completion_len=(2, 10))]
    run, cfg = make_run(tmp_path, padded, tiny_student, shards, top_k=16, logprob_bits=32)
    score.run(cfg, run, 0)
    shard = ScoreShard(run.fs, run.shard_path(0, "scores", 0))
    assert shard.vocab_size == VOCAB
    model.eval()
    for row, sample in zip(shards[0], shard):
        ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(row["prompt_ids"]) - 1 : -1, :VOCAB].double()
        assert sample.topk_ids_TK.max() < VOCAB
        check_against_reference(sample, torch.log_softmax(logits, -1), row["completion_ids"], 16, lp_tol=0.0)


def test_vllm_extraction_drops_padded_ids_and_checks_alignment():
    """The vLLM scorer's reading of vLLM's own FlatLogprobs layout (per position: the target, then the
    top ids by rank), without an engine: padded ids (≥ V) are skipped and the K kept are the best real
    ones; a target that is not the completion token, or too many padded ids, is a one-line error."""
    pytest.importorskip("vllm")
    from vllm.logprobs import FlatLogprobs

    from opd.stages.scorer import Seq
    from opd.stages.scorer_vllm import VLLMScorer

    V, K = 100, 3
    sc = object.__new__(VLLMScorer)  # the extraction's four numbers, no engine
    sc.V, sc.K, sc.want, sc.num = V, K, K + 1, K + 1 + 2  # 2 extra ids asked for the padding
    prompt, completion = [5, 6, 7], [8, 9]
    lps = [-2.5, -0.5, -1.0, -1.2, -2.0, -3.0, -4.0]

    def out(top):  # vllm.RequestOutput's two fields the scorer reads
        flat = FlatLogprobs()
        flat.append(None)
        for target in (prompt + completion)[1:]:
            flat.append_fast([target] + top, lps, iter(range(len(lps))), [None] * len(lps))
        return type("Out", (), {"prompt_logprobs": flat, "num_cached_tokens": 0})()

    seq = Seq("a/0", np.array(prompt + completion[:-1]), len(prompt), np.array(completion))
    got = sc._extract(seq, out([101, 50, 102, 40, 30, 20]))
    assert got["topk_ids_NK"].tolist() == [[50, 40, 30]] * 2
    assert np.allclose(got["topk_logprobs_NK"], [[-1.0, -2.0, -3.0]] * 2) and np.allclose(got["taken_N"], -2.5)
    assert (got["tail_N"] >= -4.0).all() and (got["tail_N"] <= -4.0 + np.log(V - K) + 1e-6).all()
    with pytest.raises(OpdError, match="padded vocabulary rows"):
        sc._extract(seq, out([101, 102, 103, 50, 40, 30]))
    with pytest.raises(OpdError, match="misaligned"):
        sc._extract(Seq("b/0", seq.input_ids, len(prompt), np.array([8, 10])), out([101, 50, 102, 40, 30, 20]))


def test_teacher_whose_logits_are_not_lm_head_of_the_base_model(tmp_path, tiny_teacher, tiny_student, teacher_model):
    """A config the model's forward ignores but the lm_head-only path would apply (soft-capping): the
    stage must notice the mismatch and score with the model's own logits."""
    odd = tmp_path / "odd-teacher"
    shutil.copytree(tiny_teacher, odd)
    config = json.loads((odd / "config.json").read_text())
    config["final_logit_softcapping"] = 0.2
    (odd / "config.json").write_text(json.dumps(config))
    rows = rollout_rows(4, 4, completion_len=(2, 8))
    run, cfg = make_run(tmp_path, odd, tiny_student, [rows], top_k=8)
    score.run(cfg, run, 0)
    for row, sample in zip(rows, ScoreShard(run.fs, run.shard_path(0, "scores", 0))):
        comp = row["completion_ids"]
        check_against_reference(sample, reference_logp(teacher_model, row["prompt_ids"], comp, 1.0), comp, 8, 1 / 32)


def test_batching_and_padding_do_not_change_the_cache(tmp_path, tiny_teacher, tiny_student):
    shards = [rollout_rows(2, 12, prompt_len=(1, 30), completion_len=(0, 30))]
    caches, padded = [], []
    for budget in (1, 100_000):
        run, cfg = make_run(tmp_path / str(budget), tiny_teacher, tiny_student, shards, max_tokens_per_batch=budget)
        summary = score.run(cfg, run, 0)
        caches.append(score_shards(run))
        padded.append(summary.extras.padded_tokens)
    assert padded[0] == sum(
        len(r["prompt_ids"]) + len(r["completion_ids"]) - 1 for r in shards[0] if r["completion_ids"]
    )  # one unpadded sequence per batch
    assert padded[1] > padded[0]  # everything in one padded batch
    ((small_table, _),) = caches[0].values()
    ((large_table, _),) = caches[1].values()
    for col in ("sample_id", "num_positions", "topk_ids"):
        assert small_table.column(col).equals(large_table.column(col))
    small, large = (
        ScoreShard(r.fs, r.shard_path(0, "scores", 0))
        for r in (RunDir(tmp_path / "1" / "run"), RunDir(tmp_path / "100000" / "run"))
    )
    # float32 results may differ in the last bit between batch shapes (BLAS blocking), never more
    for a, b in zip(small, large):
        np.testing.assert_array_equal(a.topk_ids_TK, b.topk_ids_TK)
        np.testing.assert_allclose(a.topk_logprobs_TK, b.topk_logprobs_TK, rtol=0, atol=1 / 16 + 1e-6)
        np.testing.assert_allclose(a.taken_logprobs_T, b.taken_logprobs_T, rtol=0, atol=2e-6)
        np.testing.assert_allclose(a.tail_logprobs_T, b.tail_logprobs_T, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------ errors


def test_vocabulary_mismatch_is_a_one_line_error(tmp_path, tiny_teacher, tiny_student):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_teacher, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    run, cfg = make_run(tmp_path, other, tiny_student, [rollout_rows(0, 2)])
    with pytest.raises(OpdError) as e:
        score.run(cfg, run, 0)
    msg = str(e.value)
    assert "\n" not in msg and str(other) in msg and str(tiny_student) in msg and "vocabulary" in msg
    assert "<extra-token>" in msg
    assert not storage.exists(run.fs, run.stage_dir(0, "scores"))


def test_missing_rollouts_is_a_one_line_error(tmp_path, tiny_teacher, tiny_student):
    run, cfg = make_run(tmp_path, tiny_teacher, tiny_student, None)
    with pytest.raises(OpdError) as e:
        score.run(cfg, run, 0)
    assert "\n" not in str(e.value) and f"run `opd rollout {run.url} --round 0` first" in str(e.value)


def test_render_teacher_template_without_messages_is_an_error(tmp_path, tiny_teacher, tiny_student):
    run, cfg = make_run(
        tmp_path, tiny_teacher, tiny_student, [rollout_rows(0, 2, completion_len=(1, 3))], render="teacher_template"
    )
    with pytest.raises(OpdError, match="no prompt_messages"):
        score.run(cfg, run, 0)


# ------------------------------------------------------------------------------------------ rendering


def test_teacher_template_changes_the_prompt_but_keeps_completion_alignment(
    tmp_path, tiny_teacher, tiny_student, teacher_model
):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    rows = rollout_rows(3, 4, completion_len=(2, 10))
    for i, row in enumerate(rows):
        messages = [{"role": "user", "content": f"What is {i} + {i * 3}?"}]
        row["prompt_messages"] = json.dumps(messages)
        row["prompt_ids"] = tok(messages[0]["content"], add_special_tokens=False)["input_ids"]  # no template
    run, cfg = make_run(tmp_path, tiny_teacher, tiny_student, [rows], render="teacher_template", top_k=8)
    score.run(cfg, run, 0)
    shard = ScoreShard(run.fs, run.shard_path(0, "scores", 0))
    for row, sample in zip(rows, shard):
        comp = row["completion_ids"]
        text = tok.apply_chat_template(json.loads(row["prompt_messages"]), add_generation_prompt=True, tokenize=False)
        teacher_prompt = tok(text, add_special_tokens=False)["input_ids"]
        assert len(teacher_prompt) > len(row["prompt_ids"])
        assert sample.taken_logprobs_T.shape == (len(comp),)
        check_against_reference(sample, reference_logp(teacher_model, teacher_prompt, comp, 1.0), comp, 8, 1 / 32)
        student_view = reference_logp(teacher_model, row["prompt_ids"], comp, 1.0)
        assert np.abs(sample.taken_logprobs_T - student_view[torch.arange(len(comp)), comp].numpy()).max() > 1e-3


# ------------------------------------------------------------------------------------------ sharding, resume, skip


def test_two_workers_produce_the_single_worker_shards(tmp_path, tiny_teacher, tiny_student):
    shards = [rollout_rows(10 + s, 4) for s in range(5)]
    single, cfg1 = make_run(tmp_path / "single", tiny_teacher, tiny_student, shards)
    score.run(cfg1, single, 0)
    split, cfg2 = make_run(tmp_path / "split", tiny_teacher, tiny_student, shards)
    first = score.run(cfg2, split, 0, shard=ShardSpec.parse("0/2"))
    assert first.shards_written == 3 and not first.done
    assert split.existing_shards(0, "scores") == [0, 2, 4]
    assert not storage.exists(split.fs, storage.join(split.stage_dir(0, "scores"), "_DONE.json"))
    second = score.run(cfg2, split, 0, shard=ShardSpec.parse("1/2"))
    assert second.shards_written == 2 and second.done
    a, b = score_shards(single), score_shards(split)
    assert sorted(a) == sorted(b) == [f"part-{s:05d}" for s in range(5)]
    for name in a:
        assert a[name][0].equals(b[name][0]) and a[name][1] == b[name][1]
    ma, mb = (read_manifest(r, r.stage_dir(0, "scores")) for r in (single, split))
    assert [e.sha256 for e in ma.shards] == [e.sha256 for e in mb.shards] and ma.summary == mb.summary


def test_finished_stage_is_skipped_refused_with_another_config_and_redone_with_force(
    tmp_path, tiny_teacher, tiny_student
):
    run, cfg = make_run(tmp_path, tiny_teacher, tiny_student, [rollout_rows(0, 3)])
    score.run(cfg, run, 0)
    path = run.shard_path(0, "scores", 0)
    mtime = os.stat(path).st_mtime_ns
    again = score.run(cfg, run, 0)
    assert again.skipped and "already done" in again.line and os.stat(path).st_mtime_ns == mtime
    # settings that change no byte of the cache (batching: test_batching_and_padding_do_not_change_the_cache)
    # are outside the config hash: the finished stage stays finished
    for how in ({"max_tokens_per_batch": 64}, {"device": "cpu"}):
        assert cfg.replace("score", **how).section_hash("score") == cfg.section_hash("score")
        assert score.run(cfg.replace("score", **how), run, 0).skipped
    for what in ({"top_k": 4}, {"temperature": 0.5}, {"logprob_bits": 16}, {"dtype": "bfloat16"}):
        assert cfg.replace("score", **what).section_hash("score") != cfg.section_hash("score")
    other = cfg.replace("score", top_k=4)
    with pytest.raises(FingerprintMismatch, match="--force"):
        score.run(other, run, 0)
    redone = score.run(other, run, 0, force=True)
    assert not redone.skipped and ScoreShard(run.fs, path).top_k == 4


def test_kill_and_rerun_completes_every_shard_once(tmp_path, tiny_teacher, tiny_student):
    n_shards = 6  # one sample per batch (48-token budget): each shard takes tens of milliseconds
    shards = [rollout_rows(100 + s, 4, prompt_len=(8, 12), completion_len=(30, 36)) for s in range(n_shards)]
    run, cfg = make_run(tmp_path / "killed", tiny_teacher, tiny_student, shards, max_tokens_per_batch=48)
    scores_dir = Path(run.stage_dir(0, "scores"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd.pipeline.cli", "score", run.url, "--round", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    try:  # the event: the first score shard renamed into place (written whole), then SIGKILL at once
        wait_for(lambda: bool(list(scores_dir.glob("part-*.parquet"))), proc, "the first score shard", poll_s=0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    present = run.existing_shards(0, "scores")
    assert 1 <= len(present) < n_shards, "the worker finished before it could be killed; make shards slower"
    assert not (scores_dir / "_DONE.json").exists()
    leftover = scores_dir / ".tmp-part-00005.parquet.12345-deadbeef"  # as a writer killed mid-write leaves
    leftover.write_bytes(b"half a parquet file")

    resumed = score.run(cfg, run, 0)
    assert resumed.shards_present == len(present) and resumed.shards_written == n_shards - len(present)
    names = sorted(os.listdir(scores_dir))
    assert names == sorted([f"part-{s:05d}.parquet" for s in range(n_shards)] + ["_DONE.json"])
    manifest = read_manifest(run, str(scores_dir))
    assert [e.name for e in manifest.shards] == [f"part-{s:05d}.parquet" for s in range(n_shards)]

    clean, cfg2 = make_run(tmp_path / "clean", tiny_teacher, tiny_student, shards, max_tokens_per_batch=48)
    score.run(cfg2, clean, 0)
    a, b = score_shards(run), score_shards(clean)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][0].equals(b[name][0]) and a[name][1] == b[name][1]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_score(tmp_path, tiny_teacher, tiny_student):
    run, _ = make_run(tmp_path, tiny_teacher, tiny_student, [rollout_rows(0, 3), rollout_rows(1, 2)])
    runner = CliRunner()
    res = runner.invoke(main, ["score", run.url, "--round", "0", "--device", "cpu", "--set", "score.top_k=8"])
    assert res.exit_code == 0, res.output
    assert "score round 0: 2 shards scored" in res.output and "stage done" in res.output
    assert ScoreShard(run.fs, run.shard_path(0, "scores", 1)).top_k == 8
    res = runner.invoke(main, ["score", run.url, "--round", "0", "--set", "score.top_k=8"])
    assert res.exit_code == 0 and "already done" in res.output
    res = runner.invoke(main, ["score", run.url, "--round", "1"])
    assert res.exit_code == 1
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "opd rollout" in err
    res = runner.invoke(main, ["score", run.url, "--round", "0", "--shard", "2/2"])
    assert res.exit_code == 1 and "--shard" in res.stderr
    res = runner.invoke(main, ["verify", run.url])  # the manifest and shards pass the checking readers
    assert res.exit_code == 0 and "rounds/0000/scores: ok (2 shards, 5 rows)" in res.output, res.output


def test_later_rounds_check_the_previous_rounds_student(tmp_path, tiny_teacher, tiny_student):
    run, cfg = make_run(tmp_path, tiny_teacher, tiny_student, [rollout_rows(0, 2)])
    rows = rollout_rows(1, 3)
    write_rollout_shard(run.fs, run.shard_path(1, "rollouts", 0), rows, producer={"stage": "rollout"})
    finalize_stage(
        run,
        run.stage_dir(1, "rollouts"),
        stage="rollouts",
        round_index=1,
        num_shards=1,
        producer={"stage": "rollout"},
        row_count=lambda p: parquet_rows(run, p),
    )
    with pytest.raises(OpdError, match=f"run `opd train {run.url} --round 0` first"):
        score.run(cfg, run, 1)
    # what the learner leaves: an HF checkpoint (without `opd models`' own marker file)
    shutil.copytree(tiny_student, run.stage_dir(0, "student"), ignore=shutil.ignore_patterns("_DONE.json"))
    with pytest.raises(OpdError, match="round 0 student is not finished"):  # ...but not before its manifest
        score.run(cfg, run, 1)
    write_manifest(run, run.stage_dir(0, "student"), Manifest(stage="student", round=0, shards=[], producer={}))
    summary = score.run(cfg, run, 1)
    assert summary.extras.positions == sum(len(r["completion_ids"]) for r in rows)
    assert ScoreShard(run.fs, run.shard_path(1, "scores", 0)).sample_ids == [r["sample_id"] for r in rows]


def test_rerun_keeps_valid_shards_and_replaces_a_damaged_one(tmp_path, tiny_teacher, tiny_student):
    run, cfg = make_run(tmp_path, tiny_teacher, tiny_student, [rollout_rows(20 + s, 3) for s in range(3)])
    score.run(cfg, run, 0)
    before = score_shards(run)
    os.remove(storage.join(run.stage_dir(0, "scores"), "_DONE.json"))  # as if killed before the manifest
    Path(run.shard_path(0, "scores", 1)).write_bytes(b"not parquet")
    again = score.run(cfg, run, 0)
    assert (again.shards_present, again.shards_written, again.extras.shards_replaced) == (2, 1, 1)
    assert again.done and "replaced" in again.line
    after = score_shards(run)
    for name in before:
        assert before[name][0].equals(after[name][0])


def test_follow_scores_rollout_shards_as_they_appear(tmp_path, tiny_teacher, tiny_student):
    """`opd score --follow`: shards are scored while the rollout stage is unfinished, and the stage ends
    with the same cache as a plain run once the rollout manifest appears."""
    shards = [rollout_rows(0, 3), rollout_rows(1, 2), rollout_rows(2, 4)]
    run, cfg = make_run(tmp_path, tiny_teacher, tiny_student, None, top_k=8)
    write_rollout_shard(run.fs, run.shard_path(0, "rollouts", 0), shards[0], producer={"stage": "rollout"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd.pipeline.cli", "score", run.url, "--round", "0", "--follow", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def scored(shard):
        wait_for(lambda: storage.exists(run.fs, run.shard_path(0, "scores", shard)), proc, f"score shard {shard}")

    scored(0)  # scored with no rollout manifest anywhere
    assert read_manifest(run, run.stage_dir(0, "rollouts")) is None
    write_rollout_shard(run.fs, run.shard_path(0, "rollouts", 1), shards[1], producer={"stage": "rollout"})
    scored(1)
    assert proc.poll() is None  # still following: the rollout stage has not finished
    write_rollout_shard(run.fs, run.shard_path(0, "rollouts", 2), shards[2], producer={"stage": "rollout"})
    finalize_stage(
        run,
        run.stage_dir(0, "rollouts"),
        stage="rollouts",
        round_index=0,
        num_shards=3,
        producer={"stage": "rollout"},
        row_count=lambda p: parquet_rows(run, p),
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "3 shards scored" in out and "stage done" in out
    followed = {name: sh[0] for name, sh in score_shards(run).items()}
    # a plain (non-following) run over the same rollouts gives the same cache
    plain, _ = make_run(tmp_path / "plain", tiny_teacher, tiny_student, shards, top_k=8)
    score.run(load_run_config(plain), plain, 0, device="cpu")
    for name, (table, _) in score_shards(plain).items():
        assert table.equals(followed[name])
    assert read_manifest(run, run.stage_dir(0, "scores")).total_rows == 9
