"""`opd sweep`: a grid of training settings (λ × β × lr, any `train.*` key) from one round's rollouts and
teacher scores, the teacher never loaded for training; every setting evaluated; one table at the end.

    opd sweep RUN --round 0 --grid train.beta=0,0.5,1 --grid train.lmbda=0,1 [--name NAME]
              [--devices cpu,cpu | 0,1] [--shard i/N] [--eval auto|none|cache|heldout] [--metric M] [--force]

RUN/sweeps/NAME/ (NAME defaults to "round{R}-" + the grid's keys):
  sweep.json     the sweep's manifest: source run and round, grid, settings (folder → overrides), eval
                 mode; written first, and a later sweep of that name with another grid is refused
  <setting>/     one run folder per setting, named from its values (beta0.5_lmbda1): exactly what
                 `opd train --from RUN/rounds/R --out <setting> --set ...` makes (launch.from_cache:
                 RUN's config + the overrides, links to RUN's round R shards), with rounds/R/student/
                 trained by the train stage; `--eval cache` adds <setting>/sweep_eval.json, `--eval
                 heldout` the held-out round <setting>/rounds/R+1/heldout/ with its eval.json
  table.csv, table.md, table.png, results.json   once every setting is trained and evaluated

The grid and the checks made before anything trains: sweep_grid.py. Settings train one after another in
one process, which decodes the round's shards once for all of them (one stages/train_data.DecodedShards,
and one stages/learner.LoadedStudents for the start student, passed to every setting). `--shard i/N`
takes settings k with k % N == i (array jobs; the worker that finds every setting finished writes the
table); `--devices` with several entries starts one such worker per device (processes of the local
launcher, launchers.py). Resume is the train stage's: a finished setting is skipped, an interrupted one
restarts from its checkpoint (train.checkpoint_every_steps) or from scratch, with the same result.

Evaluation (`--eval`): `none`; `cache` (pipeline/sweep_eval.py: teacher-forced on round R's held-out
samples and their cached scores, no teacher); `heldout`: each student samples the held-out prompts
(the rollout stage of <setting> round R+1, split heldout: with vLLM `opd rollout` in a process of its
own per student, a fresh engine each; with transformers in this process), then one teacher load scores
all of them and evaluate.py (evaluate_round) computes held-out reverse KL and checker accuracy as
`opd run` reports them, for each student and for the start student (round R's held-out split). `auto` = cache where round R has a held-out cache, else none.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import MANIFEST, RunDir, ShardSpec, read_manifest, split_folder
from opd.configs.schema import load_run_config
from opd.pipeline import sweep_table
from opd.pipeline.evaluate import evaluate_round, read_eval
from opd.pipeline.launch import from_cache
from opd.pipeline.launchers import DevicePool, LocalLauncher, Worker, WorkerFailed, run_all
from opd.pipeline.sweep_eval import cache_figures
from opd.pipeline.sweep_grid import (
    Setting,
    check_round,
    default_name,
    make_settings,
    note_offpolicy_beta,
    parse_grid,
    short_key,
)
from opd.pipeline.sweep_grid import validate as _validate
from opd.pipeline.sweep_table import CACHE_EVAL_FILE, RESULTS_FILE, SWEEP_FILE, SWEEP_FORMAT, SWEEP_VERSION, read_json
from opd.stages import console, train
from opd.stages.devices import resolve_device
from opd.stages.learner import LoadedStudents
from opd.stages.students import start_student
from opd.stages.train_data import DecodedShards, RoundData

EVAL_MODES = ("auto", "none", "cache", "heldout")


# ------------------------------------------------------------------------------------------ the command


@dataclass
class _Sweep:
    """One sweep invocation: the source run, the spec and where things go."""

    src: RunDir
    round_index: int
    name: str
    settings: list[Setting]
    grid: list[tuple[str, list[str]]]
    eval_mode: str
    metric: str

    @property
    def folder(self) -> str:
        return storage.join(self.src.root, "sweeps", self.name)

    def url(self, s: Setting) -> str:
        return f"{self.src.url.rstrip('/')}/sweeps/{self.name}/{s.name}"

    def spec(self) -> dict[str, Any]:
        return {
            "format": SWEEP_FORMAT,
            "version": SWEEP_VERSION,
            "name": self.name,
            "source": self.src.url,
            "round": self.round_index,
            "grid": {k: vs for k, vs in self.grid},
            "set": list(self.settings[0].common) if self.settings else [],
            "settings": [{"name": s.name, "overrides": s.overrides} for s in self.settings],
            "eval": self.eval_mode,
        }


def sweep(
    run_url: str,
    round_index: int,
    grid_items,
    name: str | None = None,
    devices: str | None = None,
    shard: str | None = None,
    eval_mode: str = "auto",
    metric: str | None = None,
    force: bool = False,
    overrides=(),
) -> dict[str, Any]:
    """Train (this worker's share of) the grid, evaluate, and return {"line", "table", ...}.
    `overrides`: train.* values every setting shares (--set)."""
    t0 = time.perf_counter()
    src = RunDir(run_url)
    src.require_initialised()
    cfg = load_run_config(src)
    grid = parse_grid(grid_items)
    settings = make_settings(grid, tuple(overrides))
    _validate(src, grid, tuple(overrides), settings)
    rollouts = check_round(src, round_index, grid)
    note_offpolicy_beta(src, settings, grid, rollouts)
    mode = _eval_mode(src, round_index, eval_mode, cfg)
    metric = sweep_table.check_metric(metric or "", mode)
    sw = _Sweep(src, round_index, name or default_name(round_index, grid), settings, grid, mode, metric)
    _write_spec(sw, force)
    pool = DevicePool.parse(devices)
    spec = ShardSpec.parse(shard)
    if pool.workers > 1:
        if spec.count > 1:
            raise OpdError("give --devices with several entries or --shard i/N, not both")
        _pool_workers(sw, pool, grid_items, force)
    else:
        own = [s for k, s in enumerate(settings) if spec.owns(k)]
        console.say(
            f"sweep {sw.name}: {len(settings)} settings of round {round_index}"
            + (f", this worker ({spec}) {len(own)}" if spec.count > 1 else "")
            + f"; eval {mode}; {rollouts.summary.get('samples', '?')} samples, no teacher for training"
        )
        dev = _device_overrides(pool)
        _warm_imports()
        decoded, loaded = DecodedShards(), LoadedStudents()  # shared by this worker's settings
        for s in own:
            _train_setting(sw, s, dev, force, decoded, loaded)
        if mode == "cache":
            _cache_evals(sw, own, dev, force, decoded)
        del decoded, loaded  # free the round's decoded cache and the kept student before held-out scoring
        if mode == "heldout":
            _heldout_evals(sw, own, pool, dev, force)
    return _finish(sw, time.perf_counter() - t0)


def _warm_imports() -> None:
    """transformers imports its model classes lazily on first use (~6 s here); do it once, before the
    first setting, so each setting's recorded wall is its own cost (the process start is counted apart)."""
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.models.auto import modeling_auto  # noqa: F401


def _eval_mode(src: RunDir, R: int, mode: str, cfg) -> str:
    if mode not in EVAL_MODES:
        raise OpdError(f"--eval {mode!r} is invalid (one of: {', '.join(EVAL_MODES)})")
    has_cache = all(
        read_manifest(src, src.stage_dir(R, split_folder("heldout", st))) is not None for st in ("rollouts", "scores")
    )
    if mode == "auto":
        return "cache" if has_cache else "none"
    if mode == "cache" and not has_cache:
        raise OpdError(
            f"--eval cache needs round {R}'s held-out samples and scores ({src.stage_dir(R, 'heldout/scores')}/"
            f"{MANIFEST} not found): run `opd rollout` and `opd score {src.url} --round {R} --split heldout`, "
            f"or use --eval heldout / none"
        )
    if mode == "heldout" and not cfg.eval.enabled:
        raise OpdError(f"--eval heldout needs a held-out prompt set: set eval.prompts in {src.config_path}")
    return mode


def _write_spec(sw: _Sweep, force: bool) -> None:
    path = storage.join(sw.folder, SWEEP_FILE)
    want = sw.spec()
    if storage.exists(sw.src.fs, path) and not force:
        try:
            have = json.loads(storage.read_bytes(sw.src.fs, path))
        except ValueError:
            raise OpdError(f"{path}: unreadable; delete it or pass --force") from None
        if have == want:
            return
        raise OpdError(
            f"{path}: a sweep named {sw.name!r} with another grid or eval exists; "
            f"use another --name, or --force to replace it"
        )
    storage.makedirs(sw.src.fs, sw.folder)
    storage.atomic_write_bytes(sw.src.fs, path, json.dumps(want, indent=2).encode())


def _device_overrides(pool: DevicePool) -> list[str]:
    if pool.kind == "cpu":
        return ["train.device=cpu", "score.device=cpu"]
    if pool.kind == "cuda":
        return [f"train.device=cuda:{pool.devices[0]}", f"score.device=cuda:{pool.devices[0]}"]
    return []


def _train_setting(
    sw: _Sweep, s: Setting, dev: list[str], force: bool, decoded: DecodedShards, loaded: LoadedStudents
) -> dict:
    """The setting's folder (links to round R's shards) and its trained student; when it trained, one
    `"stage": "sweep"` line in its metrics.jsonl with the setting's wall seconds inside the sweep
    (folder, load, learner steps, export) next to the learner's own (train_s)."""
    t0 = time.perf_counter()
    out = from_cache(sw.src, sw.round_index, sw.url(s), s.overrides, force=force)
    summary = train.run(load_run_config(out, dev), out, sw.round_index, force=force, decoded=decoded, loaded=loaded)
    if not summary.get("skipped"):
        record = {"stage": "sweep", "sweep": sw.name, "setting": s.name, "time": time.time()}
        record.update(wall_s=round(time.perf_counter() - t0, 3), train_s=summary.get("train_s"))
        out.append_metrics(sw.round_index, record)
    console.say(f"[{s.name}] {summary['line']}")
    return summary


def _cache_evals(sw: _Sweep, own: list[Setting], dev: list[str], force: bool, decoded: DecodedShards) -> None:
    """--eval cache: each trained student (and the start student, once) on round R's held-out cache."""
    R = sw.round_index
    cfg = load_run_config(sw.src, dev)
    device = resolve_device(cfg.train.device, "train.device")
    targets = [(s.name, RunDir(sw.url(s)), storage.join(sw.folder, s.name, CACHE_EVAL_FILE)) for s in own]
    targets.append((sweep_table.START, sw.src, storage.join(sw.folder, f"start-{CACHE_EVAL_FILE}")))
    data = None
    for label, run, path in targets:
        key = _student_key(sw, run)
        have = read_json(sw.src.fs, path)
        if have and have.get("student") == key and not force:
            continue
        student_round = R if run is sw.src else R + 1  # a setting's trained student is the one round R+1 starts from
        with start_student(load_run_config(run, dev), run, student_round) as student:
            if data is None:
                data = RoundData(sw.src, R, vocab_limit=student.vocab_rows, split="heldout", decoded=decoded)
            figures = cache_figures(data, student, device, cfg.train.temperature, cfg.train.max_tokens_per_batch)
        storage.atomic_write_bytes(sw.src.fs, path, json.dumps({"student": key, **figures}, indent=2).encode())
        console.say(
            f"[{label}] cache eval: reverse KL {figures['cache_rkl']:.4f}, forward KL {figures['cache_fkl']:.4f}, "
            f"NLL {figures['cache_nll']:.4f} (teacher-forced, {figures['cache_tokens']} tokens)"
        )


def _student_key(sw: _Sweep, run: RunDir) -> str:
    """What a cached evaluation belongs to: the student (its manifest digest; the start student's
    folder or name) and the held-out cache (its manifest digest)."""
    R = sw.round_index
    held = read_manifest(sw.src, sw.src.stage_dir(R, "heldout/scores"))
    if run is sw.src:
        prev = read_manifest(sw.src, sw.src.stage_dir(R - 1, train.STAGE)) if R > 0 else None
        who = prev.digest() if prev else f"run.student={load_run_config(sw.src).run.student}"
    else:
        m = read_manifest(run, run.stage_dir(R, train.STAGE))
        who = m.digest() if m else ""
    return f"{who}:{held.digest() if held else ''}"


def _heldout_evals(sw: _Sweep, own: list[Setting], pool: DevicePool, dev: list[str], force: bool) -> None:
    """--eval heldout: each student samples the held-out prompts (with vLLM a process each: a fresh
    engine per student; the transformers engine in this process), then one teacher load scores every
    setting's samples and evaluate.py computes the figures."""
    from opd.stages import rollout, score
    from opd.stages.engine import resolve_engine_name

    R1 = sw.round_index + 1
    for s in own:
        run = RunDir(sw.url(s))
        if read_manifest(run, run.stage_dir(R1, "heldout/rollouts")) is not None and not force:
            continue
        cfg = load_run_config(run, dev)
        if resolve_engine_name(cfg.rollout.engine) == "transformers":
            summary = rollout.run(cfg, run, R1, engine="transformers", force=force, split="heldout")
            console.say(f"[{s.name}] {summary.line}")
            continue
        args = ["rollout", run.url, "--round", str(R1), "--split", "heldout"] + (["--force"] if force else [])
        console.say(f"[{s.name}] held-out rollout: opd rollout {run.url} --round {R1} --split heldout")
        try:  # this worker's GPU (an index into the GPUs it sees), or the CPU
            run_all(LocalLauncher(), [Worker("rollout", s.name, args, visible=pool.visible(0), round_index=R1)])
        except WorkerFailed as e:
            raise OpdError(
                f"[{s.name}] `opd rollout {run.url} --round {R1} --split heldout` exited with status {e.status} "
                f"(log: {run.log_path(R1, 'rollout')}); run `opd sweep` again to resume"
            ) from None
    teacher = None
    try:
        for s in own:
            run = RunDir(sw.url(s))
            cfg = load_run_config(run, dev)
            done = read_manifest(run, run.stage_dir(R1, "heldout/scores")) is not None
            if done and read_eval(run, R1) is not None and not force:
                continue
            if teacher is None:
                teacher = score.Teacher(cfg, None)
            summary = score.run(cfg, run, R1, split="heldout", force=force, teacher=teacher)
            ev = evaluate_round(cfg, run, R1, force=True)  # the scores may be new: never a stale eval.json
            console.say(f"[{s.name}] {summary.line}\n[{s.name}] {ev.line}")
    finally:
        if teacher is not None:
            teacher.release()
    if teacher is not None:
        _add_counter(sw, "teacher_loads", teacher.loads)
    if read_manifest(sw.src, sw.src.stage_dir(sw.round_index, "heldout/scores")) is not None:
        ev = evaluate_round(load_run_config(sw.src, dev), sw.src, sw.round_index, force=force)  # the start row
        if ev.computed:
            console.say(f"[{sweep_table.START}] {ev.line}")


def _add_counter(sw: _Sweep, key: str, n: int) -> None:
    """Counts kept across invocations and workers (one small file per worker run, summed)."""
    path = storage.join(sw.folder, "counters", f"{key}-{time.time_ns()}.json")
    storage.makedirs(sw.src.fs, storage.join(sw.folder, "counters"))
    storage.atomic_write_bytes(sw.src.fs, path, json.dumps({key: n}).encode())


def _counter(sw: _Sweep, key: str) -> int:
    folder = storage.join(sw.folder, "counters")
    total = 0
    for name in storage.listdir(sw.src.fs, folder) if storage.exists(sw.src.fs, folder) else []:
        if name.startswith(key + "-") and name.endswith(".json"):
            total += int((read_json(sw.src.fs, storage.join(folder, name)) or {}).get(key, 0))
    return total


def _pool_workers(sw: _Sweep, pool: DevicePool, grid_items, force: bool) -> None:
    """One `opd sweep --shard i/N --devices d` worker per pool entry, all at once (the local launcher)."""
    n = pool.workers
    workers = []
    for i in range(n):
        args = ["sweep", sw.src.url, "--round", str(sw.round_index), *(x for g in grid_items for x in ("--grid", g))]
        args += [x for o in sw.settings[0].common for x in ("--set", o)]
        args += ["--name", sw.name, "--eval", sw.eval_mode, "--shard", f"{i}/{n}", "--metric", sw.metric]
        args += ["--devices", "cpu" if pool.kind == "cpu" else "0"] + (["--force"] if force else [])
        label = f"worker {i}/{n} on {pool.devices[i]}"
        workers.append(Worker("sweep", label, args, visible=pool.visible(i), round_index=sw.round_index))
    try:
        run_all(LocalLauncher(), workers, announce=lambda w: console.say(f"sweep {sw.name}: {w.label}"))
    except WorkerFailed as e:
        raise OpdError(
            f"sweep {sw.name}: {e.job.worker.label} exited with status {e.status} (its error is above); "
            f"run the same `opd sweep` again to resume"
        ) from None


# ------------------------------------------------------------------------------------------ the table


def setting_rows(sw: _Sweep) -> tuple[list[dict], int]:
    """A row per setting (values, train summary, eval figures where present); how many are complete."""
    rows, complete = [], 0
    R = sw.round_index
    for s in sw.settings:
        run = RunDir(sw.url(s))
        row = s.row()
        m = read_manifest(run, run.stage_dir(R, train.STAGE)) if storage.exists(run.fs, run.root) else None
        ev_ok = False
        if m is not None:
            row.update({k: m.summary.get(k) for k in ("first_loss", "last_loss", "train_s")})
            if sw.eval_mode == "none":
                ev_ok = True
            elif sw.eval_mode == "cache":
                ev = read_json(sw.src.fs, storage.join(sw.folder, s.name, CACHE_EVAL_FILE))
                if ev and ev.get("student") == _student_key(sw, run):
                    row.update({k: ev.get(k) for k in sweep_table.FIGURES if k in ev})
                    ev_ok = True
            else:
                ev = read_eval(run, R + 1) if read_manifest(run, run.stage_dir(R + 1, "heldout/scores")) else None
                if ev is not None:
                    row.update(
                        heldout_rkl=ev["heldout_rkl"],
                        accuracy=ev.get("accuracy"),
                        heldout_teacher_nll=ev.get("heldout_teacher_nll"),
                    )
                    ev_ok = True
        complete += m is not None and ev_ok
        rows.append(row)
    return rows, complete


def _start_row(sw: _Sweep) -> dict | None:
    """The start student's figures, from the same evaluation as the settings'."""
    if sw.eval_mode == "cache":
        ev = read_json(sw.src.fs, storage.join(sw.folder, f"start-{CACHE_EVAL_FILE}"))
        return {k: ev.get(k) for k in sweep_table.FIGURES if k in ev} if ev else None
    if sw.eval_mode == "heldout":
        ev = read_eval(sw.src, sw.round_index)
        return {"heldout_rkl": ev["heldout_rkl"], "accuracy": ev.get("accuracy")} if ev else None
    return None


def _finish(sw: _Sweep, wall_s: float) -> dict[str, Any]:
    rows, complete = setting_rows(sw)
    n = len(sw.settings)
    if complete < n:
        line = (
            f"sweep {sw.name}: {complete}/{n} settings trained and evaluated; the table is written when all are "
            f"(run the other --shard workers, or this command again)"
        )
        return {"line": line, "table": "", "complete": False, "settings": n, "done": complete}
    keys = [short_key(k) for k, _ in sw.grid]
    df = sweep_table.build(rows, keys, sw.metric, _start_row(sw))
    title = (
        f"opd sweep {sw.name}: round {sw.round_index} of {sw.src.url}, {n} settings, eval {sw.eval_mode}, "
        f"sorted by {sw.metric}"
    )
    paths = sweep_table.write(sw.src.fs, sw.folder, df, sw.metric, title)
    best = next((r for r in df.iter_rows(named=True) if r["best"] == "*"), None)
    results = {
        **sw.spec(),
        "metric": sw.metric,
        "best": best["setting"] if best else None,
        "rows": df.to_dicts(),
        "teacher_loads": _counter(sw, "teacher_loads"),
    }
    storage.atomic_write_bytes(sw.src.fs, storage.join(sw.folder, RESULTS_FILE), json.dumps(results, indent=2).encode())
    best_text = (
        f"; best {best['setting']} ({sw.metric} {best[sw.metric]:.4g})"
        if best and best.get(sw.metric) is not None
        else ""
    )
    loads = f"; teacher loads for held-out scoring: {results['teacher_loads']}" if sw.eval_mode == "heldout" else ""
    line = f"sweep {sw.name}: {n} settings done in {wall_s:.0f} s{best_text}{loads}; table {paths['md']} (+ .csv, .png)"
    return {"line": line, "table": sweep_table.to_text(df), "complete": True, "results": results, "paths": paths}
