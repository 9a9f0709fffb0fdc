"""Every code block of README.md runs as written, in order, in a copy of the repository (slow).

A Python or shell block must be preceded by a marker saying how it is tested:
  <!-- readme-test: python -->        run in a subprocess from the copy's root
  <!-- readme-test: shell -->         run with bash there; `python train.py` commands get SMALL appended
  <!-- readme-test: skip (why) -->    not run (network, real weights, several hosts, installs)
The shell blocks use the offline configs, so the Python blocks after them read those runs' outputs, as a
newcomer following the README would.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import users_env

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- readme-test: (python|shell|skip)\b[^>]*-->\s*$")
# What makes a `python train.py` command of the README a smoke run (later flags win over the README's).
SMALL = ("--config.train.steps=4 --config.optim.warmup_steps=1 --config.train.log_every=2 --config.train.save_every=2 "
         "--config.data.max_eval_examples=16 --config.eval.max_generate=4 --config.generate.max_new_tokens=8")


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(marker kind or '', language, code) of each fenced block, in order."""
    out = []
    for match in BLOCK.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        out.append((marker.group(1) if marker else "", match.group(1), match.group(2)))
    return out


def shell_for_test(code: str) -> str:
    """The block with `python` as this interpreter and SMALL after each `python train.py` command."""
    lines = code.replace("\\\n", " ").splitlines()
    fixed = []
    for line in lines:
        line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment would swallow SMALL
        if line.startswith("python "):
            line = f"{sys.executable} {line[len('python '):]}"
            if " train.py " in f" {line} ":
                line = f"{line} {SMALL}"
        fixed.append(line)
    return "\n".join(fixed) + "\n"


def test_every_python_and_shell_block_of_the_readme_says_how_it_is_tested():
    found = blocks(README.read_text())
    unmarked = [code.splitlines()[0] for kind, lang, code in found if lang in ("python", "bash", "sh") and not kind]
    assert not unmarked, f"README blocks without a <!-- readme-test: ... --> marker: {unmarked}"
    kinds = [kind for kind, _, _ in found]
    assert kinds.count("python") >= 2 and kinds.count("shell") >= 3


@pytest.mark.slow
@pytest.mark.longest  # about 2 min on 2 idle cores
def test_every_readme_code_block_runs(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "runs", "artifacts", "__pycache__",
                                                              ".benchmarks", "*.egg-info"))
    env = users_env(PYTHONPATH=str(copy), PREFIX_JAX_HUGE_PAGES="0")
    ran = 0
    for i, (kind, lang, code) in enumerate(blocks(README.read_text())):
        if kind == "python":
            script = tmp_path / f"block_{i}.py"
            script.write_text(code)
            out = subprocess.run([sys.executable, str(script)], cwd=copy, env=env, capture_output=True, text=True,
                                 timeout=900)
        elif kind == "shell":
            out = subprocess.run(["bash", "-euo", "pipefail", "-c", shell_for_test(code)], cwd=copy, env=env,
                                 capture_output=True, text=True, timeout=1800)
        else:
            continue
        assert out.returncode == 0, f"README block {i} ({kind}) failed:\n{code}\n--- stderr:\n{out.stderr[-3000:]}"
        ran += 1
    assert ran >= 5
    assert (copy / "predictions.jsonl").is_file()  # the predict.py block wrote its output
    assert list((copy / "runs" / "gpt2_e2e_offline").glob("predictions_test_*_eval_only.jsonl"))
