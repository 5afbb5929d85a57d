"""Libraries' own test suites, fetched from the package index at test time, never copied into the repo.

Where pingpong subclasses or replaces a library's class, that library's tests run against ours:
`upstream_sdist("channels")` downloads the sdist of the installed version once per machine (into
pytest's cache directory) and returns its unpacked root.
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from tests.processes import ROOT

CACHE = ROOT / ".pytest_cache" / "upstream"
INDEX = "https://pypi.org/pypi/{package}/json"


def sdist_url(package: str, version: str) -> str:
    """The download address of `package`'s sdist at `version`, from the index's JSON API."""
    with urllib.request.urlopen(INDEX.format(package=package), timeout=60) as response:
        releases = json.load(response)["releases"]
    for file in releases.get(version, []):
        if file["packagetype"] == "sdist":
            return str(file["url"])
    raise LookupError(f"{package} {version} has no sdist on the package index")


def upstream_sdist(package: str) -> Path:
    """The unpacked sdist of the installed version of `package` (downloaded on first use)."""
    version = importlib.metadata.version(package)
    target = CACHE / f"{package}-{version}"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
            archive = Path(scratch) / "sdist.tar.gz"
            with urllib.request.urlopen(sdist_url(package, version), timeout=120) as response:
                archive.write_bytes(response.read())
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, filter="data")
            (unpacked,) = [path for path in Path(scratch).iterdir() if path.is_dir()]
            shutil.move(unpacked, target)  # whole or not at all: a failed download leaves nothing behind
    return target


def deselected_are_covered(deselected: dict[str, tuple[str, str]]) -> None:
    """Each deselected upstream test has a reason and names a test of ours, in this repo, that exists."""
    for node_id, (reason, ours) in deselected.items():
        path, _, name = ours.partition("::")
        assert reason, node_id
        assert re.search(rf"^(async )?def {re.escape(name)}\(", (ROOT / path).read_text(), re.MULTILINE), ours


PER_TEST_TIMEOUT_SECONDS = 60
RUN_TIMEOUT_SECONDS = 240


def pytest_in_sdist(
    root: Path,
    *args: str,
    config: str,
    plugins: tuple[str, ...],
    env: dict[str, str],
    python_flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run pytest on an unpacked sdist's own tests with our plugins loaded, bounded in time; never raises on failure."""
    environment = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    environment.update(PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", **env)  # leave the cached sdist as unpacked
    command = [sys.executable, *python_flags, "-m", "pytest", "-c", str(root / config), "--rootdir", str(root)]
    command += ["-p", "no:cacheprovider", *(part for plugin in plugins for part in ("-p", plugin))]
    command += [f"--timeout={PER_TEST_TIMEOUT_SECONDS}", "-v", "-rfE", *args]
    return subprocess.run(
        command, cwd=root, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False
    )
