"""Installing a built model into the repository: atomically, and only when its source changed."""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from pathlib import Path


def up_to_date(model_dir: Path, sha256: str) -> bool:
    """The model in ``model_dir`` was built from the source with this sha256 and is complete."""
    try:
        meta = tomllib.loads((model_dir / "model.toml").read_text())
        return bool(meta["source"]["sha256"] == sha256) and all(
            (model_dir / f).is_file() for f in ("labels.txt", "1/model.onnx")
        )
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return False


def install(repo: Path, name: str, onnx_file: Path, labels: list[str], model_toml: str) -> Path:
    """Write model.toml, labels.txt and 1/model.onnx into ``<repo>/<name>``, atomically.

    A running engine never sees a half-written model: everything goes into a temporary sibling
    that is renamed into place, and the previous version is removed only afterwards.
    """
    repo.mkdir(parents=True, exist_ok=True)
    target, old = repo / name, repo / f".{name}.{os.getpid()}.old"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(onnx_file, tmp / "1" / "model.onnx")
        (tmp / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        (tmp / "model.toml").write_text(model_toml)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0644) so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
