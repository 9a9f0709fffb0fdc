"""Decoding on a quantized frozen LM (`model.quantize`): greedy, beam search and sampling with a fixed key, each on
a mixed-prefix batch (a bank of 3 prefixes), give, token for token, what the same decoding gives on the float
model whose weights are the quantized kernels dequantized (`qwix.dequantize`: integer values times their
scales). So every decoding step reads the quantized kernels, scales included, and nothing else.

The quantized LM is the one a run gets (`run_setup.build` with `model.quantize` set), not one built here, so the
test holds however the LM is quantized (after loading or on load).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from prefix_jax import prefix as prefix_lib
from prefix_jax import prefix_bank, run_options, run_setup
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import load_pretrained

NEW_TOKENS = 8
DECODINGS = {"greedy": dict(), "beam": dict(num_beams=3), "sampling": dict(do_sample=True, top_k=20, temperature=1.5)}


def run_config(architecture: str, model_dir, workdir, mode: str):
    from configs import llama_offline, t5_offline

    c = {"llama": llama_offline, "t5": t5_offline}[architecture].get_config()
    c.model.name_or_path, c.model.create_tiny, c.model.quantize = str(model_dir), "", mode
    c.data.max_train_examples, c.data.max_eval_examples = 16, 4
    c.data.max_source_length, c.data.max_target_length = 32, 16
    c.prefix.length, c.prefix.mlp_hidden = 4, 16
    c.train.workdir, c.train.batch_size = str(workdir), 4
    return c


def dequantized(lm_params):
    """`lm_params` with every quantized kernel (a qwix `QArray`, or a node holding one as `.array`) replaced by
    its float value: the float LM the quantized one stands for."""
    holds = lambda x: isinstance(x, qwix.QArray) or isinstance(getattr(x, "array", None), qwix.QArray)
    value = lambda x: qwix.dequantize(x if isinstance(x, qwix.QArray) else x.array) if holds(x) else x
    return jax.tree.map(value, lm_params, is_leaf=holds)


def sources(vocab: int, rows: int = 4, width: int = 10):
    """Random source ids, right-padded to different lengths."""
    rng = np.random.default_rng(0)
    lengths = np.array([width, 3, 7, 5][:rows])
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    return jnp.asarray(rng.integers(3, vocab, (rows, width)) * mask, jnp.int32), jnp.asarray(mask)


@pytest.mark.parametrize("architecture,mode", [("llama", "int8"), pytest.param("llama", "int4", marks=pytest.mark.slow),
                                               pytest.param("t5", "int8", marks=pytest.mark.slow)])
def test_decoding_a_quantized_lm_equals_decoding_its_dequantized_float_copy(architecture, mode, tiny_checkpoint,
                                                                            tmp_path):
    model_dir = tiny_checkpoint(architecture)
    plan = run_setup.build(run_options.from_config(run_config(architecture, model_dir, tmp_path / "run", mode)))
    quantized = plan.lm
    assert any(x.dtype == {"int8": jnp.int8, "int4": jnp.int4}[mode] for x in jax.tree.leaves(quantized.params))
    options = plan.options.model
    float_lm = load_pretrained(str(model_dir), options.param_dtype, options.compute_dtype or None)
    assert float_lm.config == quantized.config  # the same model (dtypes, remat, attention), only the weights differ
    float_params = dequantized(quantized.params)
    assert jax.tree.structure(float_params) == jax.tree.structure(float_lm.params)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(float_params), jax.tree.leaves(float_lm.params))]
    assert any(changed)  # the dequantized kernels are not the float ones: the copy carries the quantization error

    spec = plan.spec
    prefixes = [prefix_lib.materialize(jax.tree.map(lambda x: 3.0 * x, prefix_lib.init_params(spec, jax.random.key(s))),
                                       spec) for s in range(3)]
    bank = prefix_bank.for_batch(prefix_bank.stack(prefixes), [2, 0, 1, 2])  # a mixed-prefix batch: 3 prefixes
    ids, mask = sources(quantized.config.vocab_size)
    outputs = {}
    for name, settings in DECODINGS.items():
        cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, **settings)
        rng = jax.random.key(7) if cfg.do_sample else None
        tokens = [np.asarray(make_generate_fn(model, cfg)(params, bank, ids, mask, rng))
                  for model, params in ((quantized.model, quantized.params), (float_lm.model, float_params))]
        np.testing.assert_array_equal(tokens[0], tokens[1], err_msg=f"{architecture} {mode} {name}")
        outputs[name] = tokens[0]
    assert len(np.unique(outputs["greedy"])) > 3  # real text-like output, not one repeated token
    assert not np.array_equal(outputs["sampling"], outputs["greedy"])  # sampling samples
