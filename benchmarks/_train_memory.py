"""bench_train.py's peak-memory figure: a fresh `bench_train.py --memory-variant V` process per variant
(what one step adds on top of the loaded model and AdamW state; see bench_train.py's docstring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _train_setup import Setup
from _train_steps import OpdStep

BENCH_TRAIN = Path(__file__).resolve().with_name("bench_train.py")  # the variant processes' entry point


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def step_peak(fn) -> int:
    """Bytes the process's resident set rose to above where it stood, while `fn()` ran (the kernel's
    peak-RSS mark, reset first through /proc/self/clear_refs)."""
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return _status("VmHWM") - base


def memory_variant(run_dir: str, variant: str) -> None:
    """(subprocess) Bytes a step adds on top of the loaded model and AdamW state, on the largest
    micro-batch: `loss_step` = forward + backward (activations, logits, loss, gradients), `full_step` =
    the same plus clipping and the AdamW update. Prints a JSON object."""
    setup = Setup(run_dir)
    big = max(setup.plan, key=lambda mb: len(mb) * int(setup.data.length_S[mb].max()))
    step = OpdStep(setup, [big, big, big], variant)
    step()  # warm-up: AdamW state, lazy allocations
    peaks = {}
    for name in ("loss_step", "full_step"):
        peaks[name] = step_peak(step.loss_step if name == "loss_step" else lambda: (step.loss_step(), step.update()))
        if name == "loss_step":
            step.opt.zero_grad(set_to_none=True)
    print(
        json.dumps(
            {
                "variant": variant,
                **peaks,
                "grad_bytes": sum(p.numel() * p.element_size() for p in step.params),
                "rows": len(big),
                "padded_tokens": len(big) * int(setup.data.length_S[big].max()),
                "completion_tokens": setup.tokens(big),
            }
        )
    )


def measure_memory(run_dir: str, variant: str, threads: int) -> dict:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    out = subprocess.run(
        [sys.executable, str(BENCH_TRAIN), "--memory-variant", variant, "--run", run_dir, "--threads", str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
