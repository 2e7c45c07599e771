"""`opd verify RUN`: re-check every finished stage (manifest, checksums, shard formats and versions)."""

from __future__ import annotations

from opd.cache import shards, storage
from opd.cache.rundir import STAGES, RunDir, read_manifest, verify_shards


def verify_run(run_url: str) -> list[str]:
    """One line per stage folder; raises OpdError (one line, naming the file) at the first problem."""
    run = RunDir(run_url)
    run.require_initialised()
    lines = []
    for r in run.rounds():
        for stage in STAGES:
            stage_dir = run.stage_dir(r, stage)
            if not storage.exists(run.fs, stage_dir):
                continue
            label = f"rounds/{r:04d}/{stage}"
            manifest = read_manifest(run, stage_dir)
            if manifest is None:
                lines.append(f"{label}: unfinished ({len(run.existing_shards(r, stage))} shards present)")
                continue
            verify_shards(run, stage_dir, manifest)
            for entry in manifest.shards:
                path = storage.join(stage_dir, entry.name)
                if stage == "rollouts":
                    table, _ = shards.read_rollout_shard(run.fs, path)
                    n = table.num_rows
                elif stage == "scores":
                    n = len(shards.ScoreShard(run.fs, path))
                else:
                    continue
                if n != entry.rows:
                    raise shards.FormatError(
                        f"{path}: holds {n} rows, {stage}/_DONE.json says {entry.rows}; re-run the stage with --force"
                    )
            if stage == "student":
                lines.append(f"{label}: ok ({len(manifest.shards)} files checked)")
            else:
                lines.append(f"{label}: ok ({len(manifest.shards)} shards, {manifest.total_rows} rows)")
    if not lines:
        lines.append(f"{run.url}: initialised, no stage finished yet")
    return lines
