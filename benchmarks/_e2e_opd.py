"""bench_e2e.py's opd side: `opd init` + `opd run` (or the stage commands) of a round, `opd sweep` over its cache."""

from __future__ import annotations

import json
from pathlib import Path

from _e2e_common import _DTYPE, STAGES, _metrics, _not_implemented, _opd, _sh, _train_summary


class Opd:
    """opd runs of one benchmark invocation (all under `root`)."""

    def __init__(self, args, root: Path):
        from opd.configs.schema import PACKAGED_CONFIGS

        self.args, self.root = args, root
        self.prompts_file = str(PACKAGED_CONFIGS / "tiny_prompts.jsonl")
        self.use_run = not _not_implemented("run")
        self.base: Path | None = None  # the run whose round 0 rollouts + scores the sweep reuses
        self.base_stage_s: dict = {}  # wall seconds of init / rollout / score / train of that run

    def overrides(self, beta: float | None = None, lr: float | None = None, both: bool = False) -> list[str]:
        a = self.args
        sets = [f"rollout.offpolicy_rows={'both' if both else 'lambda'}"] + [
            f"rollout.prompts={self.prompts_file}",
            "rollout.prompt_field=prompt",
            "rollout.id_field=id",
            f"rollout.max_prompts={a.prompts}",
            f"rollout.n={a.n}",
            f"rollout.max_new_tokens={a.max_new_tokens}",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "rollout.top_k=-1",
            "rollout.lmbda=1.0",
            f"rollout.engine={a.opd_engine}",
            "rollout.lmbda_schedule=[]",
            "train.loss=jsd",
            f"train.beta={a.beta if beta is None else beta}",
            f"train.lr={a.lr if lr is None else lr}",
            "train.lr_schedule=cosine",
            "train.warmup_steps=0",
            "train.max_grad_norm=1.0",
            "train.weight_decay=0.0",
            "train.epochs=1",
            "train.grad_accum=1",
            "run.rounds=1",
            "eval.prompts=",
            f"rollout.dtype={_DTYPE[a.precision]}",
            f"score.dtype={_DTYPE[a.precision]}",
            f"train.dtype={_DTYPE[a.precision]}",
        ]
        if a.smoke:  # the tiny preset's models, but the folders TRL also trains
            sets += [f"run.student={a.smoke_models[1]}", f"run.teacher={a.smoke_models[0]}"]
        out = []
        for s in sets:
            out += ["--set", s]
        return out

    def round(self, with_train: bool = True, tag: str = "", both: bool = False) -> dict:
        """One round: init + rollout + score (+ train); wall seconds per command. `both`: every prompt
        gets its samples and its reference row (rollout.offpolicy_rows = "both": λ sweeps from one cache)."""
        run = self.root / f"opd-round{tag}"
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        walls = {}
        preset = "tiny" if self.args.smoke else "smollm2"
        sets = self.overrides(both=both)
        walls["init"], _, _ = _sh(_opd("init", str(run), "--config", preset, *sets), logs / f"opd-init{tag}.log")
        if with_train and self.use_run and not both:
            walls["run"], _, _ = _sh(_opd("run", str(run), "--rounds", "1"), logs / f"opd-run{tag}.log")
        else:
            for stage in STAGES if with_train else STAGES[:2]:
                walls[stage], _, _ = _sh(_opd(stage, str(run), "--round", "0"), logs / f"opd-{stage}{tag}.log")
        self.base, self.base_stage_s = run, walls
        return walls

    def sweep(self, grid: dict[str, list], name: str = "bench") -> tuple[float, list[dict]]:
        """`opd sweep` of the grid over the base run's round 0 (one process, --eval none); (its wall
        seconds, per setting: its values, train summary and the "sweep" metrics line)."""
        args = []
        for key, values in grid.items():
            args += ["--grid", f"train.{key}=" + ",".join(f"{v:g}" for v in values)]
        wall, _, _ = _sh(
            _opd(
                "sweep",
                str(self.base),
                "--round",
                "0",
                *args,
                "--set",
                "train.beta_offpolicy=-1",
                "--eval",
                "none",
                "--name",
                name,
            ),
            self.root / "logs" / f"opd-sweep-{name}.log",
        )
        spec = json.loads((self.base / "sweeps" / name / "sweep.json").read_text())
        out = []
        for st in spec["settings"]:
            records = _metrics(self.base / "sweeps" / name / st["name"])
            inside = next((r for r in records if r.get("stage") == "sweep"), {})
            values = {o.split("=", 1)[0].split(".", 1)[1]: float(o.split("=", 1)[1]) for o in st["overrides"][1:]}
            out.append({"name": st["name"], **values, "summary": _train_summary(records), "inside": inside})
        return wall, out
