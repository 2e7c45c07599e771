"""Producer fingerprints: what made a shard (model content, tokenizer, config, format version).

Hashing a multi-GB checkpoint takes seconds, so a model's hash is remembered in
`$OPD_HOME/hashes.json` keyed by its files' (path, size, mtime); any change to a file re-hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from opd.cache import storage
from opd.cache.shards import FORMAT_VERSION

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
MODEL_FILES = ("config.json", "adapter_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def opd_home() -> Path:
    return Path(os.environ.get("OPD_HOME") or Path.home() / ".cache" / "opd")


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        storage.sha256_file(storage.LOCAL, str(p), into=h)
    return h.hexdigest()


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 over a checkpoint's weights and config (not its tokenizer), memoised by size+mtime."""
    d = Path(model_dir)
    files = sorted(p for p in d.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in MODEL_FILES))
    if not files:
        raise FileNotFoundError(f"{d}: no model weights found")
    key = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    memo_path = opd_home() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = _hash_files(files)
    memo[key] = digest
    try:
        fs, path = storage.resolve(memo_path)
        storage.atomic_write_bytes(fs, path, json.dumps(memo).encode())
    except OSError:
        pass  # read-only home: hashing again next time is only slower
    return digest


def tokenizer_hash(model_dir: str | os.PathLike) -> str:
    """sha256 of the tokenizer files (vocabulary, merges, specials, chat template)."""
    d = Path(model_dir)
    files = [d / n for n in TOKENIZER_FILES if (d / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{d}: no tokenizer files found")
    return _hash_files(files)


def derive_seed(*parts) -> int:
    """A 31-bit seed derived from `parts` (run seed, round, role, shard...): the same everywhere, any process."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def producer(stage: str, model_dir: str | os.PathLike, config_hash: str, **extra) -> dict:
    """The producer record a stage stamps on its shards and manifest."""
    return {
        "stage": stage,
        "model_hash": model_hash(model_dir),
        "tokenizer_hash": tokenizer_hash(model_dir),
        "config_hash": config_hash,
        "format_version": FORMAT_VERSION,
        **extra,
    }
