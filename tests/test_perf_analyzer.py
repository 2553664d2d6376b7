"""Triton's ``perf_analyzer`` (PyPI perf-analyzer 2.60) against the real appliance, over gRPC and HTTP.

perf-analyzer's wheel needs glibc >= 2.38; these machines run Debian 12 (2.36), where pip only finds
a 0.1.0 placeholder. So the test runs it in a Debian 13 chroot, built once with debootstrap and kept
(``RINGSERVE_PERF_CHROOT``, default /var/tmp/ringserve-perf-analyzer-trixie); the chroot shares
the loopback network with the appliance. The test skips only when that chroot cannot be built
(no root, no debootstrap, no registry), and says why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Appliance
from tests.models import write_pixel_detector

CHROOT = Path(os.environ.get("RINGSERVE_PERF_CHROOT", "/var/tmp/ringserve-perf-analyzer-trixie"))
PERF = "/opt/pa/bin/perf_analyzer"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # a registry proxy's CA is in the host's bundle
CLEAN_ENV = {"PATH": "/opt/pa/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout, check=False)


def _in_chroot(root: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return _run(["chroot", str(root), *cmd], timeout)


def build_chroot() -> str | None:
    """The chroot with perf_analyzer, built if missing; None, or why it cannot be built."""
    if (CHROOT / PERF.lstrip("/")).is_file():
        return None
    if os.geteuid() != 0:
        return "building the Debian 13 chroot for perf_analyzer needs root (debootstrap, chroot)"
    if shutil.which("debootstrap", path=CLEAN_ENV["PATH"]) is None:
        return "debootstrap is not installed (apt-get install debootstrap)"
    partial = CHROOT.with_name(CHROOT.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    boot = _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv",
            "trixie",
            str(partial),
            "http://deb.debian.org/debian",
        ],
        1200,
    )
    if boot.returncode != 0:
        return f"debootstrap trixie failed ({boot.returncode}): {boot.stdout[-500:]}{boot.stderr[-500:]}"
    shutil.copy("/etc/resolv.conf", partial / "etc" / "resolv.conf")
    (partial / "etc" / "ringserve").mkdir(exist_ok=True)
    if HOST_CA.is_file():
        shutil.copy(HOST_CA, partial / "etc" / "ringserve" / "host-ca.crt")
    venv = _in_chroot(partial, "python3", "-m", "venv", "/opt/pa")
    pip = _in_chroot(
        partial, "/opt/pa/bin/pip", "install", "--cert", "/etc/ringserve/host-ca.crt", "perf-analyzer==2.60"
    )
    if venv.returncode or pip.returncode:
        return f"pip install perf-analyzer==2.60 in the chroot failed: {venv.stderr[-300:]}{pip.stdout[-500:]}"
    partial.rename(CHROOT)
    return None


@pytest.fixture(scope="module")
def chroot() -> Path:
    why = build_chroot()
    if why is not None:
        pytest.skip(why)
    return CHROOT


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    repo = tmp_path_factory.mktemp("perf") / "repo"
    write_pixel_detector(repo)
    appliance = Appliance(repo, workers=2)
    try:
        yield appliance.start(120)
    finally:
        appliance.__exit__(None, None, None)


def perf_analyzer(chroot: Path, *args: str) -> str:
    out = _in_chroot(chroot, PERF, *args, timeout=180)
    assert out.returncode == 0, f"perf_analyzer {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.timeout(1500)  # the first run builds the chroot (debootstrap, about 5 minutes)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_measures_the_appliance(chroot: Path, app: Appliance, protocol: str) -> None:
    url = app.grpc_url if protocol == "grpc" else app.url.removeprefix("http://")
    out = perf_analyzer(
        chroot,
        "-m",
        "pixels",
        "-i",
        protocol,
        "-u",
        url,
        "--concurrency-range",
        "4",
        "--measurement-interval",
        "2000",
        "--stability-percentage",
        "100",
        "--max-trials",
        "3",
    )
    rate = re.search(r"Concurrency: 4, throughput: ([\d.]+) infer/sec", out)
    assert rate and float(rate.group(1)) > 0, out
    print(f"perf_analyzer -i {protocol}, pixel detector, concurrency 4: {rate.group(1)} infer/s")
    # perf_analyzer read the server-side statistics (the statistics extension) for its report
    assert "Server:" in out and "Inference count:" in out, out
