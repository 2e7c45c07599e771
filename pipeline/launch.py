"""`opd train`: where the learner runs (this process, or torchrun over several devices), and re-training
from another run's cache (`--from RUN/rounds/R --out NEWRUN`).

    opd train RUN --round 0 --devices 0,1          # torchrun: 2 processes, one GPU each (NCCL)
    opd train RUN --round 0 --devices cpu,cpu      # 2 CPU processes (gloo): tests and small runs
    opd train --from RUN/rounds/0 --out NEWRUN --set train.beta=0.5   # re-train from the cache, no teacher
    opd train RUN --round 0 --devices 0,1 --nnodes 2 --rdzv-endpoint HOST:29400   # on each of 2 machines

Re-run from cache: NEWRUN/opd.toml is written by `opd init`'s machinery from RUN's config plus the --set
overrides; the round's rollouts and scores (and, for R > 0, the round R-1 student they were sampled
from) are hard-linked (copied across filesystems or to object stores) into NEWRUN/rounds/ with their
manifests, then NEWRUN's round R is trained (checksums checked as in any run). Shards are never
modified in place, so links are safe. The teacher is never resolved nor loaded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import MANIFEST, RunDir, clear_stage, read_manifest
from opd.configs.schema import load_run_config
from opd.pipeline.init import init_run
from opd.pipeline.launchers import DevicePool, LocalLauncher, Worker, WorkerFailed, run_all
from opd.pipeline.torchrun import loopback
from opd.stages import console, sft, train
from opd.stages.sft_data import SftData
from opd.stages.students import load_tokenizer, start_student
from opd.stages.train_data import RoundData
from opd.stages.train_metrics import summary_line


def launch(
    run_dir: str | None,
    round_index: int | None,
    devices: str | None = None,
    from_round: str | None = None,
    out: str | None = None,
    force: bool = False,
    overrides=(),
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    sft_data: str | None = None,
) -> dict[str, Any]:
    """`opd train`: re-run from a cache (--from/--out) if asked, then train in this process (no or one
    device) or under torchrun (several devices: "0,1" GPUs, "cpu,cpu" CPU processes; with `nnodes` > 1
    one torchrun per machine, all meeting at the c10d rendezvous `rdzv_endpoint`). `sft_data`: `opd sft`,
    fine-tuning on that file (stages/sft.py) instead of training from the round's cache."""
    if nnodes < 1:
        raise OpdError(f"--nnodes {nnodes} is invalid: must be >= 1")
    if (nnodes > 1) != (rdzv_endpoint is not None):
        raise OpdError("--nnodes N > 1 and --rdzv-endpoint HOST:PORT go together (the rendezvous all machines meet at)")
    overrides = list(overrides)
    if from_round is not None:
        if out is None:
            raise OpdError("--from needs --out NEWRUN: the run folder to create for the re-run")
        if run_dir is not None:
            raise OpdError("give either RUN_DIR or --from RUN/rounds/R, not both")
        run_dir, round_index = _from_cache(from_round, out, round_index, overrides, force)
        overrides = []  # now part of NEWRUN/opd.toml
    elif run_dir is None or round_index is None:
        raise OpdError("give RUN_DIR and --round R (or --from RUN/rounds/R --out NEWRUN)")
    elif out is not None:
        raise OpdError("--out goes with --from RUN/rounds/R")
    pool = DevicePool.parse(devices).distinct("--devices")
    if pool.kind == "cpu":
        overrides.append("train.device=cpu")
    elif pool.kind == "cuda":
        one = len(pool.devices) == 1 and nnodes == 1  # this process: cuda:N numbers the GPUs it sees, as the pool does
        overrides.append(f"train.device=cuda:{pool.devices[0]}" if one else "train.device=cuda")
    rd = RunDir(run_dir)
    cfg = load_run_config(rd, overrides)
    if len(pool.devices) <= 1 and nnodes == 1:
        if sft_data is not None:
            return sft.run(cfg, rd, round_index, sft_data, force=force)
        return train.run(cfg, rd, round_index, force=force)

    with start_student(cfg, rd, round_index) as start:  # one-line errors before spawning
        if sft_data is not None:
            sft.check_round(rd, round_index)
            SftData(cfg, sft_data, load_tokenizer(start.tokenizer_dir, "student"), str(start.tokenizer_dir))
        else:
            RoundData(rd, round_index, vocab_limit=start.vocab_rows, lmbda=cfg.train.lmbda, seed=cfg.run.seed)
    worker = _torchrun_worker(rd, round_index, pool, nnodes, rdzv_endpoint, force, overrides, sft_data)
    try:
        run_all(LocalLauncher(), [worker])
    except WorkerFailed as e:
        where = f" (its messages: {console.log_path()})" if console.log_path() else " (its messages are above)"
        raise OpdError(
            f"torchrun with {pool.workers} process(es) on this machine exited with status {e.status}{where}"
        ) from None
    student_dir = rd.stage_dir(round_index, train.STAGE)
    done = read_manifest(rd, student_dir)
    if done is None:
        raise OpdError(f"torchrun finished but {student_dir}/{MANIFEST} is missing")
    stage = "train" if sft_data is None else "sft"
    summary = {"stage": stage, "round": round_index, "skipped": False, **done.summary}
    summary["line"] = (
        summary_line(summary, student_dir) if "world_size" in done.summary else f"{stage} round {round_index}: done"
    )
    return summary


def _torchrun_worker(
    rd: RunDir,
    round_index: int,
    pool: DevicePool,
    nnodes: int,
    rdzv: str | None,
    force: bool,
    overrides: list[str],
    sft_data: str | None = None,
) -> Worker:
    """torchrun (pipeline/torchrun.py) with one learner process per pool entry on this machine, as a
    Worker of the local launcher (its output goes where this process's goes: the stage's log). One
    machine: a standalone rendezvous; several: the c10d rendezvous at `rdzv`. A rendezvous on loopback
    keeps every listener there (the stores, gloo's and NCCL's sockets, the workers' MASTER_ADDR)."""
    host = "127.0.0.1" if nnodes == 1 else rdzv.rsplit(":", 1)[0]
    if nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        run_id = f"opd-{round_index}-{hashlib.sha256(rd.url.encode()).hexdigest()[:12]}"
        rendezvous = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv, "--rdzv-id", run_id]
    env = {"OPD_TRAIN_LAUNCHED": "1"}  # the processes leave the summary line to this one
    if loopback(host):
        rendezvous += ["--local-addr", host.strip("[]")]
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if key not in os.environ:
                env[key] = "lo"
    args = [*rendezvous, "--nproc-per-node", str(pool.workers), "-m", "opd.pipeline.torchrun", "--worker"]
    args += [rd.url, "--round", str(round_index)] + (["--force"] if force else [])
    args += ["--sft-data", sft_data] if sft_data is not None else []
    for o in overrides:
        args += ["--set", o]
    visible = pool.visible() if pool.kind == "cuda" else None
    return Worker("train", "torchrun", args, env, visible, module="opd.pipeline.torchrun", to_console=False)


def _from_cache(source: str, out: str, round_index: int | None, overrides: list[str], force: bool) -> tuple[str, int]:
    """Create NEWRUN from RUN's config + overrides and copy RUN/rounds/R's rollouts and scores (and the
    round R-1 student they were sampled from) into it; returns (NEWRUN, R)."""
    src_round = source.rstrip("/")
    parts = src_round.rsplit("/", 2)
    if len(parts) != 3 or parts[1] != "rounds" or not parts[2].isdigit():
        raise OpdError(f"--from {source!r} is invalid: expected a round folder, RUN/rounds/RRRR")
    R = int(parts[2])
    if round_index is not None and round_index != R:
        raise OpdError(f"--round {round_index} disagrees with --from {source!r} (round {R}); leave --round out")
    from_cache(RunDir(parts[0]), R, out, overrides, force)
    return out, R


def from_cache(src: RunDir, R: int, out: str, overrides: list[str], force: bool = False) -> RunDir:
    """NEWRUN = `out`: RUN's config + overrides as its opd.toml, and links to RUN's round R rollouts and
    scores (and the round R-1 student they were sampled from). Idempotent; also what `opd sweep`
    makes for each setting."""
    src.require_initialised()
    with tempfile.TemporaryDirectory(prefix="opd-from-") as tmp:
        config_file = Path(tmp) / "opd.toml"
        config_file.write_text(src.read_config_text())
        init_run(out, str(config_file), overrides, force=force)
    dst = RunDir(out)
    for r, stage in [(R, "rollouts"), (R, "scores")] + ([(R - 1, train.STAGE)] if R > 0 else []):
        _copy_stage(src, dst, r, stage)
    return dst


def _copy_stage(src: RunDir, dst: RunDir, r: int, stage: str) -> None:
    """Copy (hard-link where possible: shards are never modified in place) a finished stage folder."""
    src_dir, dst_dir = src.stage_dir(r, stage), dst.stage_dir(r, stage)
    manifest = read_manifest(src, src_dir)
    if manifest is None:
        raise OpdError(f"{src_dir}/{MANIFEST} not found: round {r}'s {stage} stage of {src.url} is not finished")
    have = read_manifest(dst, dst_dir)
    if have is not None and have.to_json() == manifest.to_json():
        return
    clear_stage(dst, dst_dir)
    both_local = isinstance(src.fs, pafs.LocalFileSystem) and isinstance(dst.fs, pafs.LocalFileSystem)
    for name in [e.name for e in manifest.shards] + [MANIFEST]:
        a, b = storage.join(src_dir, name), storage.join(dst_dir, name)
        storage.makedirs(dst.fs, os.path.dirname(b))
        if both_local:
            try:
                os.link(a, b)
                continue
            except OSError:
                pass
        pafs.copy_files(a, b, source_filesystem=src.fs, destination_filesystem=dst.fs)
