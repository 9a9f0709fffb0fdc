"""Train a prefix (Prefix-Tuning, Li & Liang 2021) on a frozen pretrained LM, evaluate it, and export it.

usage: python train.py --config CONFIG_FILE [--config.GROUP.FIELD=VALUE ...]

  CONFIG_FILE  a Python file whose get_config() gives the run's settings (configs/*.py), e.g.
               configs/t5_offline.py (offline demo: a random tiny T5 on the bundled E2E data, minutes on a CPU),
               configs/gpt2_e2e.py (GPT-2 medium on E2E, the paper's table-to-text settings).
  overrides    any field, after the file: --config.train.steps=200 --config.prefix.length=10
               --config.model.name_or_path=./DIR --config.eval.metrics='("bleu", "rouge")'

Every field, its default and what it means: prefix_jax/run_options.py (`python train.py --helpfull` lists them).
The resolved config is printed at start (the fields that differ from configs/default.py) and written in full to
<workdir>/config.json. A run writes only to train.workdir (default runs/<config file name>): config.json,
metrics.jsonl, checkpoints/, predictions_<split>_<step>.jsonl, export/ (the trained prefix without its MLP).
Rerunning the same command resumes from the latest checkpoint; --config.train.eval_only=True only evaluates it.

Exit status:
  0   done
  2   bad input: one `error:` line naming the field (or file and row) and the fix; nothing was written
  3   training diverged (too many non-finite steps in a row); the last good checkpoint is kept, nothing exported
  75  stopped by SIGTERM/SIGINT after saving a checkpoint at the step reached: rerun the same command to resume
"""

import logging
import os
import re
import sys
import traceback
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from prefix_jax import host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)

EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3
HELP_FLAGS = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull", "-helpfull")


def help_text(full: bool) -> str:
    """This command's help; `full` adds every config field with its default and meaning (each declared once, in
    prefix_jax/run_options.py)."""
    text = __doc__.strip() + "\n"
    if full:
        from prefix_jax import run_options  # imports JAX: only for --helpfull

        docs = run_options.field_docs()
        text += "\nEvery field (configs/default.py; a config file changes some of them):\n"
        text += "".join(f"  --config.{name}={value!r}  # {docs.get(name, '')}\n"
                        for name, value in _flat(run_options.default_config().to_dict()))
    return text


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested config dict -> [(group.field, value)] in the file's order."""
    out: list[tuple[str, object]] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "data_files":
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


def _config_error(error: BaseException, argv: list[str]) -> str:
    """A one-line explanation of a --config flag that could not be used."""
    text = str(error)
    if isinstance(error, KeyError) and error.args:  # an override below a field the config lacks (a.b.c=1)
        text = f"'{error.args[0]}'"
    if isinstance(error, (AttributeError, KeyError)) and text.startswith("'"):  # a field the config lacks
        field = re.findall(r"[A-Za-z_]\w*", text)[0]
        flag = next((a.split("=")[0] for a in argv if re.search(rf"\.{re.escape(field)}(\.|=|$)", a)), field)
        hint = re.search(r'Did you mean "([^"]+)"', text)
        return f"{flag}: the config has no field {field!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
    if "No such file" in text or isinstance(error, FileNotFoundError):
        return f"--config: no such config file ({_one_line(text).split('Attempted')[-1].strip()})"
    if "Error whilst parsing config file" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return f"--config: the config file failed to load ({last.strip()})"
    return _one_line(text)


def _is_ours(error: BaseException) -> bool:
    """A ValueError raised by prefix_jax itself (a bad input it explains), not a bug in a library or in us."""
    if type(error).__module__.startswith(("prefix_jax", "configs")):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "prefix_jax" in Path(frames[-1].filename).parts


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.info("%s", host_memory.status())
    try:
        flags.FLAGS(argv)
        if _CONFIG.value is None:
            raise flags.Error("--config is required, e.g. --config configs/t5_offline.py")
        config = _CONFIG.value
        config.train.workdir  # a config file that failed to load raises only when first read
    except (flags.Error, OSError, AttributeError, ImportError, SyntaxError, TypeError, ValueError, KeyError) as e:
        print(f"error: {_config_error(e, argv)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from prefix_jax import preemption, trainer  # here, not at the top: JAX loads after the huge-pages restart

    if not config.train.workdir:
        config.train.workdir = str(Path("runs") / Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem)
    try:
        summary = trainer.run(config)
        preemption.ignore_signals_after_done()  # a signal while the process winds down changes nothing
    except preemption.Preempted as e:
        logging.warning("%s", e)
        return preemption.EXIT_PREEMPTED
    except trainer.NonFiniteError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except ValueError as e:
        if not _is_ours(e) or os.environ.get("PREFIX_JAX_TRACEBACK"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.info("done: %s", summary)
    return 0


if __name__ == "__main__":
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        print(help_text(full=any(arg.lstrip("-") == "helpfull" for arg in sys.argv[1:])), end="")
        sys.exit(0)
    host_memory.reexec_with_huge_pages()  # before JAX loads: XLA's CPU temporaries on huge pages
    sys.exit(main(sys.argv))
