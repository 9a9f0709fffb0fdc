"""Decode inputs with a frozen LM and one or many trained prefixes (rows of different tasks share batches).

usage: python predict.py [--config configs/predict.py] --config.model.name_or_path=LM \\
           --config.prefixes=DIR | --config.prefixes=TASK=DIR,TASK=DIR,... | --config.checkpoint=WORKDIR \\
           [--config.input=inputs.jsonl] [--config.output=predictions.jsonl] [--config.FIELD=VALUE ...]

  LM           the model the prefixes were trained on (a Hub id or a local directory); a prefix trained on other
               weights is refused, naming both
  prefixes     exported prefixes (<workdir>/export of a train.py run); with several, each input row's `task`
               column picks its prefix
  checkpoint   or a train.py workdir: decode its latest checkpoint instead of an export
  input        .jsonl or .csv rows with `source` (and `task`, `id`, `target` for scoring), .txt one source a line,
               or - (stdin, the default)
  output       jsonl rows id, task, source, prediction (+ references); default <input>.predictions.jsonl, or stdout
               for stdin

The config file defaults to configs/predict.py, where every field, its default and its meaning are listed
(decoding options: the `generate` group, as in configs/default.py). `python -m prefix_jax.predict` is the same
command.

Exit status:
  0   done (a JSON summary with the scores goes to stderr)
  2   bad input: one `error:` line naming the field (or file and row) and the fix; nothing was written
"""

import sys

from prefix_jax import host_memory

HELP_FLAGS = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull", "-helpfull")

if __name__ == "__main__":
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        print(__doc__.strip())
        sys.exit(0)
    host_memory.reexec_with_huge_pages()  # before JAX loads: XLA's CPU temporaries on huge pages
    from prefix_jax.predict import cli  # here, not at the top: `--help` answers without loading JAX

    cli()
