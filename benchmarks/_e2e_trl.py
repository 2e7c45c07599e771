"""bench_e2e.py's TRL side: DistillationTrainer (round case) and GKDTrainer (sweep case) runs, each in a
fresh process (`bench_e2e.py --trl-worker SPEC` / `--trl-gkd-worker SPEC`) that prints a TRL_RESULT line."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from _e2e_common import STUDENT, TEACHER, _error_line, _prompts, _sh

BENCH_E2E = Path(__file__).resolve().with_name("bench_e2e.py")  # the workers' entry point


def _trainer_args(spec: dict) -> dict:
    """The training arguments both TRL trainers get: the optimizer, schedule and clipping opd uses, one
    epoch, temperature 1, and TRL's fastest CPU settings (see the module docstring). bf16: fp32 master
    weights under bf16 autocast for the student, bf16 teacher weights (what opd's learner and scorer do
    with dtype = "bfloat16"); fp32: everything in float32."""
    return dict(
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        temperature=1.0,
        model_init_kwargs={"dtype": "float32"},
        teacher_model_init_kwargs={"dtype": "bfloat16" if spec["precision"] == "bf16" else "float32"},
        use_cpu=True,
        bf16=spec["precision"] == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def _train_and_save(trainer, out: str) -> tuple[float, float, list[float]]:
    """(train seconds, save seconds, logged losses) of a TRL trainer run as a user would: train, then
    save_model."""
    t0 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.save_model(str(Path(out) / "student"))
    t_save = time.perf_counter() - t0
    return t_train, t_save, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def trl_worker(spec_path: str) -> None:
    """(subprocess) One DistillationTrainer run as a user would write it; prints a JSON line."""
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    if not spec.get("use_vllm"):
        # TRL imports vLLM whenever it is installed (~4 s here) though transformers generation never uses it;
        # hiding it gives TRL the start-up of an environment without vLLM (TRL then sees it as not installed).
        sys.modules["vllm"] = None
    import torch
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    t_import = time.perf_counter() - t_start
    counters = {"completion_tokens": 0, "completions": 0, "gen_s": 0.0}

    class Counting(DistillationTrainer):
        """Counts the completions DistillationTrainer samples and the time it spends sampling."""

        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            ids = super()._generate_single_turn(*a, **kw)
            counters["gen_s"] += time.perf_counter() - t0
            counters["completions"] += len(ids)
            counters["completion_tokens"] += sum(len(x) for x in ids)
            return ids

    rows = [{"prompt": [{"role": "user", "content": p}]} for p in spec["prompts"] for _ in range(spec["n"])]
    vllm = bool(spec.get("use_vllm"))
    args = DistillationConfig(
        output_dir=spec["out"],
        seed=spec["seed"],
        per_device_train_batch_size=spec["batch_size"],
        beta=spec["beta"],
        top_p=1.0,
        top_k=0,
        max_completion_length=spec["max_new_tokens"],
        **_trainer_args(spec),
        use_vllm=vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,
        vllm_max_model_length=spec.get("max_model_len"),
    )
    trainer = Counting(
        model=spec["student"], teacher_model=spec["teacher"], args=args, train_dataset=Dataset.from_list(rows)
    )
    t_init = time.perf_counter() - t_start - t_import
    t_train, t_save, losses = _train_and_save(trainer, spec["out"])
    print(
        "TRL_RESULT "
        + json.dumps(
            {
                "import_s": round(t_import, 2),
                "init_s": round(t_init, 2),
                "train_s": round(t_train, 2),
                "gen_s": round(counters["gen_s"], 2),
                "save_s": round(t_save, 2),
                "steps": trainer.state.global_step,
                "completions": counters["completions"],
                "completion_tokens": counters["completion_tokens"],
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def trl_gkd_worker(spec_path: str) -> None:
    """(subprocess) One GKDTrainer run (TRL's λ/β trainer: with probability λ a batch is the student's own
    samples, else the dataset's reference answers; full-vocabulary generalized JSD_β against the online
    teacher) as a user would write it; prints a JSON line."""
    t_start = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    sys.modules["vllm"] = None  # as in trl_worker: GKD generates with transformers
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    t_import = time.perf_counter() - t_start
    copies = 1 if spec["lmbda"] == 0 else spec["n"]  # λ = 0: one reference row per prompt (what opd trains on)
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ref}]}
        for p, ref in zip(spec["prompts"], spec["references"])
        for _ in range(copies)
    ]
    args = GKDConfig(
        output_dir=spec["out"],
        seed=spec["seed"],
        per_device_train_batch_size=spec["batch_size"],
        lmbda=spec["lmbda"],
        beta=spec["beta"],
        max_new_tokens=spec["max_new_tokens"],
        **_trainer_args(spec),
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["student"])  # GKD's collator needs it before the trainer loads one
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = GKDTrainer(
        model=spec["student"],
        teacher_model=spec["teacher"],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    t_init = time.perf_counter() - t_start - t_import
    t_train, t_save, losses = _train_and_save(trainer, spec["out"])
    result = {
        "import_s": round(t_import, 2),
        "init_s": round(t_init, 2),
        "train_s": round(t_train, 2),
        "save_s": round(t_save, 2),
        "steps": trainer.state.global_step,
        "rows": len(rows),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "threads": torch.get_num_threads(),
    }
    print("TRL_RESULT " + json.dumps(result), flush=True)


class Trl:
    def __init__(self, args, root: Path):
        from opd.stages.models import resolve_model

        self.args, self.root = args, root
        if args.smoke:
            self.teacher, self.student = map(str, args.smoke_models)
        else:
            self.teacher, self.student = str(resolve_model(TEACHER)), str(resolve_model(STUDENT))
        self.prompts = _prompts(args.prompts)
        self.references = _prompts(args.prompts, "reference")
        self.runs = 0

    def run(
        self,
        batch_size: int,
        beta: float,
        lr: float,
        use_vllm: bool = False,
        timeout: float | None = None,
        lmbda: float | None = None,
    ) -> dict:
        """DistillationTrainer (λ = 1), or GKDTrainer when `lmbda` is given; a fresh process each."""
        self.runs += 1
        out = self.root / f"trl-{self.runs}"
        out.mkdir(parents=True, exist_ok=True)
        spec = {
            "student": self.student,
            "teacher": self.teacher,
            "prompts": self.prompts,
            "n": self.args.n,
            "max_new_tokens": self.args.max_new_tokens,
            "beta": beta,
            "lr": lr,
            "batch_size": batch_size,
            "seed": 0,
            "out": str(out),
            "use_vllm": use_vllm,
            "max_model_len": 512 if use_vllm else None,
            "precision": self.args.precision,
            "lmbda": lmbda,
            "references": self.references,
        }
        (out / "spec.json").write_text(json.dumps(spec))
        worker = "--trl-worker" if lmbda is None else "--trl-gkd-worker"
        wall, rc, tail = _sh(
            [sys.executable, str(BENCH_E2E), worker, str(out / "spec.json")],
            self.root / "logs" / f"trl-{self.runs}.log",
            timeout=timeout,
            check=not use_vllm,
        )
        result = {"wall_s": wall, "rc": rc}
        for line in tail.splitlines():
            if line.startswith("TRL_RESULT "):
                result.update(json.loads(line[len("TRL_RESULT ") :]))
        if rc != 0:
            result["error"] = _error_line(tail, rc)
        shutil.rmtree(out / "student", ignore_errors=True)  # 0.2 GB a run; the workdir stays small
        return result


def _batch_for_steps(samples: int, steps: int) -> int:
    """The largest per-device batch that gives `steps` optimizer steps over `samples` rows (TRL drops an
    incomplete last batch, so the batch must divide the sample count; the nearest divisor otherwise)."""
    divisors = [b for b in range(1, samples + 1) if samples % b == 0]
    return min(divisors, key=lambda b: (abs(samples // b - steps), -b))
