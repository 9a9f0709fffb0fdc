"""`model.quantize` in the product: a run on a quantized tiny Llama trains, evaluates, decodes, checkpoints only the
prefix and records the float LM's fingerprint; a bad value is one error line; a changed mode blocks a resume."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import REPO, losses, run_cli

from prefix_jax import checkpoint, fingerprint, trainer
from prefix_jax.models import load_pretrained


def quantized_config(model_dir, workdir, mode="int8"):
    from configs import llama_offline

    c = llama_offline.get_config()
    c.model.name_or_path, c.model.create_tiny, c.model.quantize = str(model_dir), "", mode
    c.data.max_train_examples, c.data.max_eval_examples = 16, 4
    c.data.max_source_length, c.data.max_target_length = 32, 16
    c.prefix.length, c.prefix.mlp_hidden = 4, 16
    c.eval.max_generate, c.generate.max_new_tokens = 4, 4
    c.train.workdir, c.train.steps, c.train.batch_size, c.train.log_every = str(workdir), 8, 4, 1
    c.optim.learning_rate, c.optim.warmup_steps = 5e-2, 1
    return c


def test_an_int8_run_trains_evaluates_decodes_and_checkpoints_no_lm_weight(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    config = quantized_config(tiny_llama_dir, run)
    summary = trainer.run(config)
    loss = losses(run)
    assert sorted(loss) == list(range(1, 9)) and loss[8] < 0.95 * loss[1], loss  # 11.47 -> 10.40
    assert np.isfinite(summary["eval_loss"]) and "bleu" in summary
    assert list(run.glob("predictions_validation_8.jsonl"))

    lm = load_pretrained(str(tiny_llama_dir), config.model.param_dtype)  # the float (bfloat16) LM, unquantized
    lm_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    mngr = checkpoint.manager(run / "checkpoints", read_only=True)
    meta = checkpoint.read_meta(mngr)
    restored = checkpoint.read_state(mngr, 8)
    mngr.close()
    assert set(restored["params"]) == {"decoder"}  # the prefix only
    disk_bytes = sum(p.stat().st_size for p in (run / "checkpoints").rglob("*") if p.is_file())
    assert disk_bytes < lm_bytes / 10
    # The float checkpoint's fingerprint: the prefix fits the float LM it was trained on (quantized).
    assert meta["lm_fingerprint"] == fingerprint.lm_fingerprint(lm.params)
    assert meta["resume"]["model.quantize"] == "int8"

    for other in ("none", "int4"):
        with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model\.quantize"):
            trainer.run(quantized_config(tiny_llama_dir, run, other))


def test_a_bad_quantize_value_is_one_error_line_naming_the_field(tiny_llama_dir, tmp_path):
    out = run_cli("--config", str(REPO / "configs/llama_offline.py"), f"--config.model.name_or_path={tiny_llama_dir}",
                  "--config.model.create_tiny=", f"--config.train.workdir={tmp_path / 'w'}",
                  "--config.model.quantize=int3")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "model.quantize='int3'" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()
