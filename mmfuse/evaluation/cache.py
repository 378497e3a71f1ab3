"""Result cache: a task's model outputs keyed by (model hash, task hash), so a re-run skips the
model (and does not even load it).

- Model hash: sha256 of the model directory's weights file and ``config.yaml``. The digest is
  remembered per file (path, size, modification time) in ``<cache>/digests.json``, so a
  large weights file is read once.
- Task hash: sha256 of what decides the outputs: the data file's bytes (media files are not
  hashed: replace a medium under the same name and clear the cache), the prompt, the record
  limit, the multiple-choice settings, the passes run, the generation settings and the media
  dropped, and the code that produces outputs (the mmfuse and data_modules sources but the
  metric, table and runner modules; torch and transformers versions), so a changed decoder,
  processor or generation loop is never served stale outputs. Metrics and post-processing
  are not in it: changing them re-scores the cached outputs without the model.

Entries are JSON files ``<cache>/results/<key>.json``, written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
import transformers

from mmfuse.model_dir import CONFIG, WEIGHTS

_ROOT = Path(__file__).resolve().parent.parent.parent
# sources that only score, print or orchestrate: editing them keeps cached outputs valid
_SCORING_ONLY = ("mmfuse/metrics/", "mmfuse/evaluation/", "mmfuse/serve/", "mmfuse/chat.py")
_OUTPUT_MODULES = ("mmfuse/evaluation/inference.py", "mmfuse/evaluation/tasks.py")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 of the sources that decide model outputs and of the torch and transformers
    versions."""
    digest = hashlib.sha256(f"{torch.__version__}/{transformers.__version__}".encode())
    files = sorted([*_ROOT.glob("mmfuse/**/*.py"), *_ROOT.glob("data_modules/**/*.py")])
    for path in files:
        name = path.relative_to(_ROOT).as_posix()
        if name.startswith(_SCORING_ONLY) and name not in _OUTPUT_MODULES:
            continue
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class ResultCache:
    """Model outputs per (model, task) key under ``root``; ``root=None`` caches nothing."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def _digest(self, path: Path) -> str:
        if self.root is None:
            return file_sha256(path)
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        memo_file = self.root / "digests.json"
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
        entry = memo.get(str(path.resolve()))
        if entry is not None and entry["stamp"] == stamp:
            return entry["sha256"]
        value = file_sha256(path)
        memo[str(path.resolve())] = {"stamp": stamp, "sha256": value}
        _write_atomic(memo_file, json.dumps(memo, indent=1))
        return value

    def model_hash(self, model_dir: str | Path) -> str:
        """sha256 over the weights file's and the saved config's digests."""
        model_dir = Path(model_dir)
        parts = [self._digest(model_dir / WEIGHTS), self._digest(model_dir / CONFIG)]
        return hashlib.sha256("/".join(parts).encode()).hexdigest()

    @staticmethod
    def key(model_hash: str, material: dict) -> str:
        text = json.dumps({"model": model_hash, "task": material}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / "results" / f"{key}.json"

    def load(self, key: str) -> list[dict] | None:
        """The cached rows for ``key``, or None."""
        if self.root is None or not self._path(key).is_file():
            return None
        return json.loads(self._path(key).read_text(encoding="utf-8"))["rows"]

    def store(self, key: str, rows: list[dict], material: dict) -> None:
        if self.root is None:
            return
        _write_atomic(self._path(key), json.dumps({"task": material, "rows": rows}))
