"""A quantized frozen LM (`prefix_jax.quantize`, qwix weight-only int8 / int4): logits near float32's, the prefix
learns through it, the quantized values never change, the step's LM argument shrinks, bad settings are refused.

Tiny random models of each family (2 layers, width 64, head_dim 16; int4 in groups of 32, so an output
projection's groups span two heads). "Real-looking" inputs: token ids drawn Zipf-like (frequent ids dominate,
as in text), whole source and target sides.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from families import bart_config, gemma_config, phi3_config
from tolerances import INT4_KL, INT4_MAX_DLOGP, INT8_KL, INT8_MAX_DLOGP

from prefix_jax import optim, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax import quantize as qz
from prefix_jax.models import bart, gemma, gpt2, llama, phi3, t5

B, S, T, VOCAB = 4, 10, 6, 101
GROUP = 32


def hf_config(architecture: str):
    if architecture == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    if architecture == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    if architecture == "t5":
        return transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                     dropout_rate=0.0, decoder_start_token_id=0, relative_attention_num_buckets=8,
                                     initializer_factor=1.0)
    # The other families' tiny configs (tests/families.py) at this file's width 64 and head_dim 16, dropout off.
    wide = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128)
    if architecture == "bart":
        return bart_config(vocab_size=VOCAB, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, dropout=0.0,
                           init_std=0.1)
    if architecture == "gemma":  # Gemma 3: q/k norms, sliding and global layers, a final logit soft-cap
        return gemma_config("gemma3_text", **wide, initializer_range=0.1)
    return phi3_config("phi3", **wide, initializer_range=0.1)  # untied head, fused qkv / gate_up projections


ARCHITECTURES = {"gpt2": gpt2, "llama": llama, "t5": t5, "bart": bart, "gemma": gemma, "phi3": phi3}


@functools.cache
def tiny(architecture: str):
    """(config, float model, float params) of a random tiny LM (gpt2 and t5 with dropout off)."""
    arch = ARCHITECTURES[architecture]
    overrides = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0) if architecture == "gpt2" else {}
    cfg = arch.Config.from_hf(hf_config(architecture), set(), **overrides)
    model = arch.Model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), text_batch(np.random.default_rng(9)))["params"]
    return cfg, model, params


@functools.cache
def quantized(architecture: str, mode: str):
    """(quantized model, quantized params) of `tiny(architecture)`."""
    _, model, params = tiny(architecture)
    qmodel = qz.quantized_model(model, params, mode, GROUP)
    return qmodel, qz.quantize_params(qmodel, params)


def text_batch(rng: np.random.Generator) -> dict:
    ids = lambda n: np.minimum(rng.zipf(1.3, (B, n)) + 2, VOCAB - 1).astype(np.int32)
    return {"source_ids": jnp.asarray(ids(S)), "source_mask": jnp.ones((B, S), jnp.int32),
            "target_ids": jnp.asarray(ids(T)), "target_mask": jnp.ones((B, T), jnp.int32)}


def log_probs(model, params, batch) -> jax.Array:
    return jax.nn.log_softmax(jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch), axis=-1)


def spec_for(cfg) -> prefix_lib.PrefixSpec:
    geometry = cfg.prefix_geometry()
    return prefix_lib.PrefixSpec(length=4, placements=tuple(geometry), geometry=geometry,
                                 hidden_size=cfg.d_model if hasattr(cfg, "d_model") else cfg.hidden_size,
                                 mlp_hidden=32)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", *(pytest.param(a, marks=pytest.mark.slow)
                                                          for a in ("t5", "bart", "gemma", "phi3"))])
@pytest.mark.parametrize("mode,max_dlogp,kl", [("int8", INT8_MAX_DLOGP, INT8_KL), ("int4", INT4_MAX_DLOGP, INT4_KL)])
def test_quantized_log_probs_are_near_float32(architecture, mode, max_dlogp, kl):
    _, model, params = tiny(architecture)
    qmodel, qparams = quantized(architecture, mode)
    batch = text_batch(np.random.default_rng(0))
    ref, got = log_probs(model, params, batch), log_probs(qmodel, qparams, batch)
    measured_kl = float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - got), axis=-1)))
    measured_max = float(jnp.max(jnp.abs(ref - got)))
    print(f"{architecture} {mode}: max|dlogp| {measured_max:.4f}, mean KL {measured_kl:.2e}")
    assert 0 < measured_max <= max_dlogp and measured_kl <= kl  # > 0: the quantized weights are really used


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("embeddings", [False, True])
def test_dense_kernels_and_vocab_matrices_are_quantized_norms_biases_stay_float(architecture, embeddings):
    """embeddings=False (`model.quantize_embeddings=False`): only Dense kernels; the embedding table and the LM
    head stay float. True (the default): the token table (and llama's untied lm_head) quantized too."""
    _, model, params = tiny(architecture)
    qparams = qz.quantize_params(qz.quantized_model(model, params, "int4", GROUP, embeddings=embeddings), params)
    names = dict(qz._with_aux_leaves(qparams))
    vocab = set(qz.vocab_matrices(params)) if embeddings else set()
    assert set(names) == {m + "/kernel" for m in qz.quantized_modules(params)} | vocab and names
    assert vocab or not embeddings
    for name, leaf in names.items():
        assert leaf.array.qvalue.dtype == jnp.int4 and leaf.array.scale.dtype == jnp.float32, name
    floats = [x for x in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, qz.WithAux))
              if not isinstance(x, qz.WithAux)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert any("lm_head" in n or "embed" in n or "wte" in n for n in names) == embeddings


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_int8_scales_are_per_output_channel_and_int4_per_group_along_the_contraction(architecture):
    _, _, params = tiny(architecture)
    flat = {n: v for n, v in qz._with_aux_leaves(quantized(architecture, "int8")[1])}
    flat4 = {n: v for n, v in qz._with_aux_leaves(quantized(architecture, "int4")[1])}
    for name, leaf in flat.items():
        kernel = np.asarray(_lookup(params, name))
        q, scale = np.asarray(leaf.array.qvalue, np.float32), np.asarray(leaf.array.scale)
        # qwix's symmetric int8: the largest |w| of each output channel maps to 127.5 (rounded, clipped to 127 or
        # -128): the scale is absmax / 127.5 over the contraction axes, and every value is within half a step.
        # [L, in..., out...]; a vocabulary matrix: the embedding table [V, D] one scale per row, the head [D, V]
        # one per column (per vocabulary entry, its output channel).
        contraction = ((1, 2) if name.endswith(("o_proj/kernel", "attn/out/kernel")) else
                       (0,) if name.endswith("lm_head/kernel") else (1,))
        assert scale.shape == tuple(1 if a in contraction else n for a, n in enumerate(kernel.shape)), name
        np.testing.assert_allclose(scale, np.abs(kernel).max(axis=contraction, keepdims=True) / 127.5, rtol=1e-6)
        np.testing.assert_allclose(q * scale, kernel, rtol=0, atol=float(scale.max()) * 0.5001)
        assert np.abs(q).max() in (127, 128)
        scale4 = np.asarray(flat4[name].array.scale)
        groups = int(np.prod(kernel.shape)) // int(np.prod(scale4.shape))
        assert groups == GROUP, (name, kernel.shape, scale4.shape)
    # A group as long as a head (16): the innermost contraction axis is tiled, and a group never spans heads.
    _, model, _ = tiny(architecture)
    for name, leaf in qz._with_aux_leaves(qz._abstract(qz.quantized_model(model, params, "int4", 16))):
        assert int(np.prod(leaf.array.qvalue.shape)) // int(np.prod(leaf.array.scale.shape)) == 16, name


def _lookup(tree, name: str):
    for key in name.split("/"):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # llama: untied lm_head [D, V]; gpt2: tied wte
def test_vocab_matrices_a_scale_per_row_and_their_lookup_and_head_read_them_block_by_block(architecture):
    """The token table [V, D] (and an untied head [D, V]): int8 one scale per vocabulary row (absmax / 127.5),
    int4 one per 32 values along the width. The lookup is the dequantized table's rows, bitwise; the head, in
    blocks of at most 13 rows (101, prime: 8 strided blocks of 13, 3 rows padded), the dequantized matrix's
    logits."""
    from prefix_jax import quantized_vocab
    from prefix_jax.models import common

    _, _, params = tiny(architecture)
    matrices = qz.vocab_matrices(params)
    assert matrices == ({"embed_tokens/embedding": 0, "lm_head/kernel": 1} if architecture == "llama"
                             else {"wte/embedding": 0})
    leaves8, leaves4 = (dict(qz._with_aux_leaves(quantized(architecture, mode)[1])) for mode in ("int8", "int4"))
    h = jax.random.normal(jax.random.key(3), (2, 5, 64), jnp.float32)
    ids = jnp.asarray(text_batch(np.random.default_rng(4))["source_ids"])
    for name, vocab_axis in matrices.items():
        matrix = np.asarray(_lookup(params, name))
        width_axis = 1 - vocab_axis
        q, scale = np.asarray(leaves8[name].array.qvalue, np.float32), np.asarray(leaves8[name].array.scale)
        assert scale.shape == tuple(1 if a == width_axis else n for a, n in enumerate(matrix.shape)), name
        np.testing.assert_allclose(scale, np.abs(matrix).max(axis=width_axis, keepdims=True) / 127.5, rtol=1e-6)
        np.testing.assert_allclose(q * scale, matrix, rtol=0, atol=float(scale.max()) * 0.5001)
        scale4 = leaves4[name].array.scale
        assert scale4.shape == tuple(n // GROUP if a == width_axis else n for a, n in enumerate(matrix.shape)), name
        for leaf in (leaves8[name], leaves4[name]):
            dense = np.asarray(quantized_vocab.dequantize(leaf.array.qvalue, leaf.array.scale))
            assert quantized_vocab.block_rows(VOCAB, 64, 13 * 64 * 4) == 13
            got = jax.jit(lambda x, m, a=vocab_axis: quantized_vocab.logits(x, m, a, jnp.float32, 13 * 64 * 4))(
                h, leaf)
            want = np.einsum("btd,vd->btv", np.asarray(h), dense if vocab_axis == 0 else dense.T)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
            if vocab_axis == 0:
                embed = common.Embed(VOCAB, 64, dtype=jnp.float32)
                rows = jax.jit(lambda t, i: embed.apply({"params": {"embedding": t}}, i))(leaf, ids)
                np.testing.assert_array_equal(np.asarray(rows), dense[np.asarray(ids)])


# (vocabulary, width, blocks the head reads it in): real vocabularies, their rows per block keeping the factors of
# two a split over devices needs (Llama 3, SmolLM2, Llama 2, Phi-3, Gemma, Qwen2; GPT-2's odd 50257: 29 x 1733).
HEAD_BLOCKS = [(128256, 8192, 501), (49152, 576, 16), (32000, 4096, 125), (32064, 3072, 167), (256000, 2048, 250),
               (151936, 896, 1187), (50257, 768, 29)]


def test_the_heads_blocks_divide_the_vocabulary_and_keep_its_split_over_devices():
    """`quantized_vocab.num_blocks`: blocks of at most `block_rows` rows, dividing the vocabulary, whose rows per
    block keep min(8, the vocabulary's) factors of two: a vocabulary split over 2^k devices (k <= 8) splits every
    strided block alike, so no device reads another's rows."""
    from prefix_jax import quantized_vocab

    twos = lambda n: (n & -n).bit_length() - 1
    for vocab, width, want in HEAD_BLOCKS:
        blocks = quantized_vocab.num_blocks(vocab, width)
        assert blocks == want and vocab % blocks == 0, (vocab, blocks)
        assert vocab // blocks <= quantized_vocab.block_rows(vocab, width)
        assert twos(vocab // blocks) >= min(twos(vocab), quantized_vocab.SPLIT_TWOS), (vocab, blocks)
        groups = 16 if twos(vocab) >= 4 else 1  # GPT-2's odd 50257 splits over no even device count
        assert quantized_vocab.layout(vocab, width, 16) == (groups, blocks, vocab // blocks // groups)
    # The view for 8 devices (8 runs of rows) on one: 96 rows in 12 blocks of 8, one row of each run; as a table
    # [V, D] and as a head kernel [D, V].
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (96, 64)).astype(np.int8)
    scale = rng.random((96, 1)).astype(np.float32)
    assert quantized_vocab.layout(96, 64, 8, 8 * 64 * 4) == (8, 12, 1)
    h = rng.standard_normal((3, 64)).astype(np.float32)
    want = h @ (q.astype(np.float32) * scale).T
    for vocab_axis, (qv, sc) in enumerate([(q, scale), (q.T, scale.T)]):
        leaf = SimpleNamespace(array=SimpleNamespace(qvalue=jnp.asarray(qv), scale=jnp.asarray(sc)))
        for devices in (1, 8):
            got = quantized_vocab.logits(jnp.asarray(h), leaf, vocab_axis, jnp.float32, 8 * 64 * 4, devices)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_a_quantized_vocab_matrix_is_split_along_its_rows_under_every_strategy():
    """`quantize.quantized_param_axes` + `partitioning`: an int8 / int4 table [V, D] and head [D, V] (values and
    scales) are split along the vocabulary under fsdp (where a float table splits its width), tensor and both (over
    their product); a vocabulary no mesh axis divides (4097) falls back to fsdp splitting the width."""
    from jax.sharding import AbstractMesh, PartitionSpec as P

    from prefix_jax import partitioning, sharding

    def shapes(vocab: int, scale_width: int) -> dict:
        part = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
        return {"embed_tokens": {"embedding": {"array": {"qvalue": part((vocab, 64), jnp.int8),
                                                         "scale": part((vocab, scale_width), jnp.float32)}}},
                "lm_head": {"kernel": {"array": {"qvalue": part((64, vocab), jnp.int8),
                                                 "scale": part((scale_width, vocab), jnp.float32)}}},
                "model": {"embed_tokens": {"embedding": part((vocab, 64), jnp.float32)}}}  # a float table's rule

    axes = qz.quantized_param_axes(llama.PARAM_AXES + ((r"model/embed_tokens/embedding", ("vocab", "embed")),))
    # (vocabulary, scale columns (int8 1, int4 2), strategy, mesh, the quantized rows' axes, a float table's spec)
    cases = [(4096, 1, "fsdp", (1, 8, 1), "fsdp", P(None, "fsdp")),
             (4096, 2, "fsdp", (1, 8, 1), "fsdp", P(None, "fsdp")),
             (4096, 1, "tensor", (2, 1, 4), "model", P("model")),
             (4096, 2, "fsdp_tensor", (1, 2, 4), ("fsdp", "model"), P("model", "fsdp"))]
    for vocab, scale_width, strategy, shape, rows, float_spec in cases:
        specs = partitioning.lm_partition_specs(shapes(vocab, scale_width), axes, strategy,
                                                AbstractMesh(shape, sharding.MESH_AXES))
        for part in ("qvalue", "scale"):
            assert specs["embed_tokens"]["embedding"]["array"][part] == P(rows), (strategy, part)
            assert specs["lm_head"]["kernel"]["array"][part] == P(None, rows), (strategy, part)
        assert specs["model"]["embed_tokens"]["embedding"] == float_spec, strategy
    specs = partitioning.lm_partition_specs(shapes(4097, 1), axes, "fsdp", AbstractMesh((1, 8, 1), sharding.MESH_AXES))
    assert specs["embed_tokens"]["embedding"]["array"]["qvalue"] == P(None, "fsdp")
    assert specs["lm_head"]["kernel"]["array"]["qvalue"] == P("fsdp")


# (architecture, the last of 20 losses below this fraction of the first): the tiny GPT-2's tied head of std 0.1
# gives flat logits, which a prefix sharpens slowly (float32 alike).
@pytest.mark.parametrize("architecture,fraction", [("llama", 0.5), ("gpt2", 0.9)])
def test_prefix_learns_on_a_quantized_lm_whose_values_stay_bitwise_unchanged(architecture, fraction):
    cfg, _, _ = tiny(architecture)
    qmodel, qparams = quantized(architecture, "int4")
    before = jax.tree.map(np.array, qparams)
    spec = spec_for(cfg)
    params = prefix_lib.init_params(spec, jax.random.key(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=1e-1, total_steps=20)
    step = train_steps.jit_train_step(qmodel, spec, tx, schedule)
    state = train_steps.init_state(params, tx, jax.random.key(2))
    # A task a prefix can learn on a frozen random LM: whatever the source, answer one fixed sentence.
    batch = {**text_batch(np.random.default_rng(3)),
             "target_ids": jnp.tile(jnp.arange(T, dtype=jnp.int32) * 7 % VOCAB + 3, (B, 1))}
    losses = []
    for _ in range(20):
        state, metrics = step(state, qparams, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < fraction * losses[0] and all(np.diff(losses) < 0), losses
    assert float(metrics["grad_norm"]) > 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), qparams, before)
    assert jax.tree.structure(qparams) == jax.tree.structure(before)


def step_argument_bytes(model, lm_params, cfg) -> int:
    spec = spec_for(cfg)
    params = prefix_lib.init_params(spec, jax.random.key(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10)
    step = train_steps.jit_train_step(model, spec, tx, schedule)
    state = train_steps.init_state(params, tx, jax.random.key(2))
    return step.lower(state, lm_params, text_batch(np.random.default_rng(0))).compile().memory_analysis() \
        .argument_size_in_bytes


@pytest.mark.parametrize("architecture", ["llama"])
def test_compiled_step_takes_the_quantized_lm_quarter_and_eighth_of_float32(architecture):
    """The step's argument bytes: float32 minus the float kernels plus the int values and scales, nothing more
    (no float copy of a quantized kernel is an argument). int4 counts as XLA stores it on this backend."""
    cfg, model, params = tiny(architecture)
    float_args = step_argument_bytes(model, params, cfg)
    for mode, bits in (("int8", 8), ("int4", 4)):
        qmodel, qparams = quantized(architecture, mode)
        kernel_bytes = qz.float_kernel_bytes(qmodel, params)
        quantized_args = step_argument_bytes(qmodel, qparams, cfg)
        leaves = [leaf.array for _, leaf in qz._with_aux_leaves(qparams)]
        values = sum(int(np.prod(q.qvalue.shape)) for q in leaves)
        scales = sum(q.scale.size * 4 for q in leaves)
        stored_bits = bits if jax.default_backend() != "cpu" or bits == 8 else _cpu_int4_bits()
        assert quantized_args == float_args - kernel_bytes + values * stored_bits // 8 + scales, mode
        ratio = (values * bits // 8 + scales) / kernel_bytes  # packed: as on TPU/GPU
        print(f"{architecture} {mode}: quantized leaves {ratio:.3f} of float32; step arguments "
              f"{quantized_args / float_args:.3f} of float32's ({quantized_args} vs {float_args} bytes)")
        assert ratio <= {8: 0.27, 4: 0.16}[bits]  # the issue's bounds for SmolLM2; the tiny layers' scales fit too


@functools.cache
def _cpu_int4_bits() -> int:
    """Bits one int4 value takes in a CPU executable's argument (XLA's CPU backend: a byte, unpacked)."""
    x = jnp.zeros((1024,), jnp.int4)
    size = jax.jit(lambda a: a).lower(x).compile().memory_analysis().argument_size_in_bytes
    return size * 8 // 1024


def test_bad_settings_are_one_line_errors_naming_the_field():
    cfg, model, params = tiny("llama")
    with pytest.raises(qz.QuantizeError, match=r"^model.quantize='int3' is not a quantization mode"):
        qz.quantized_model(model, params, "int3")
    with pytest.raises(qz.QuantizeError, match=r"^model.quantize_group_size=48 does not divide"):
        qz.quantized_model(model, params, "int4", 48)
    qmodel = qz.quantized_model(model, params, "int8")
    as_int = jax.tree.map(lambda x: x.astype(jnp.int32), params)
    with pytest.raises(qz.QuantizeError, match=r"^model.quantize: LM param .*(kernel|embedding) is int32, not float"):
        qz.quantize_params(qmodel, as_int)
    with pytest.raises(qz.QuantizeError, match=r"^model.quantize: LM param .*embedding is int32, not floating"):
        qz.quantized_model(model, as_int, "int8")  # a vocabulary matrix's dtype, read off its shapes
    assert qz.quantized_model(model, params, "none") is model and qz.quantize_params(model, params) is params


# --- Quantizing on the host, on load (the float kernel never on a device) ---------------------------------------


def _qwix_on_device(qmodel, params) -> dict:
    """What `quantize_params` did before quantizing moved to the host: qwix's `quantize`, jitted per kernel on the
    device (vmapped over the stacked layers)."""
    from qwix._src.core import qarray

    abstract = dict(qz._with_aux_leaves(qz._abstract(qmodel)))
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        target = abstract.get(qz.path_name(path))
        if target is not None:
            quantize = lambda w, how=target.how: qarray.quantize(w, how)
            out[qz.path_name(path)] = jax.jit(jax.vmap(quantize) if qz._layer_axes(target) else quantize)(value)
    return out


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_host_quantization_equals_qwix_jitted_quantize_bitwise(dtype):
    """int8, int4 (absmax) and int4 minmax (a zero point per group), on the tiny Llama in float32 and bfloat16."""
    _, model, params = tiny("llama")
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    for mode, calibration in (("int8", "absmax"), ("int4", "absmax"), ("int4", "minmax")):
        qmodel = qz.quantized_model(model, params, mode, GROUP, int4_calibration=calibration)
        reference = _qwix_on_device(qmodel, params)
        host = dict(qz._with_aux_leaves(qz.quantize_params(qmodel, params)))
        assert set(host) == set(reference) and reference
        for name, ref in reference.items():
            got = host[name].array
            assert isinstance(got.qvalue, np.ndarray), name  # made on the host
            for part in ("qvalue", "scale", "zero_point"):
                a, b = getattr(ref, part), getattr(got, part)
                assert (a is None) == (b is None), (name, part)
                if a is not None:
                    a = np.asarray(a)
                    assert a.dtype == b.dtype and np.array_equal(a.astype(np.float32), b.astype(np.float32)), (
                        mode, calibration, name, part)


@pytest.mark.parametrize("architecture", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_quantize_on_load_equals_quantize_after_load_bitwise(tiny_checkpoint, architecture):
    """`load_pretrained(..., quantize=)` (each kernel quantized as the table reads it) == loading the float LM and
    quantizing it; the float weights' fingerprint is known without them."""
    from prefix_jax import fingerprint, models

    directory = tiny_checkpoint(architecture)
    float_lm = models.load_pretrained(str(directory))
    for mode in ("int8", "int4"):
        loaded = models.load_pretrained(str(directory), quantize=mode, quantize_group_size=GROUP)
        after = qz.quantize_params(qz.quantized_model(float_lm.model, float_lm.params, mode, GROUP), float_lm.params)
        assert jax.tree.structure(loaded.params) == jax.tree.structure(after)
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(after)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a).astype(np.float32), b.astype(np.float32))
        assert loaded.float_fingerprint == fingerprint.lm_fingerprint(float_lm.params)


GGUF_KEPT_CASES = [pytest.param("Q8_0", marks=pytest.mark.slow), pytest.param("Q4_0", marks=pytest.mark.slow), "Q4_1"]


@functools.cache
def _gguf_file(family: str, storage: str):
    import tempfile
    from pathlib import Path

    from gguf_fixtures import random_model, write_gguf

    return write_gguf(random_model(family), Path(tempfile.mkdtemp()) / f"{family}_{storage}.gguf", storage)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("storage", GGUF_KEPT_CASES)
def test_gguf_blocks_are_kept_bitwise_and_give_the_dequantized_models_logits(family, storage):
    """model.quantize=gguf: every Dense kernel keeps the file's integer values and float16 scales (and mins):
    dequantized they are the float loader's weights bitwise, the stored scales are the file's, and the logits equal
    the dequantized float model's (llama: permuted Q/K rows, GQA, o_proj blocks across heads; gpt2: transposed,
    fused c_attn)."""
    import gguf as gguf_lib

    from prefix_jax import models

    path = _gguf_file(family, storage)
    float_lm = models.load_pretrained(str(path))
    kept = models.load_pretrained(str(path), quantize="gguf")
    leaves = dict(qz._with_aux_leaves(kept.params))
    assert leaves and all(isinstance(leaf.array, qz.GGUFBlocks) for leaf in leaves.values())
    for name, leaf in leaves.items():
        blocks = leaf.array
        assert blocks.qvalue.dtype == qz.GGUF_KEPT[storage] and blocks.scale.dtype == np.float16, name
        assert (blocks.min is not None) == (storage == "Q4_1")
        np.testing.assert_array_equal(np.asarray(jax.jit(qz.dequantize_blocks)(blocks)), _lookup(float_lm.params, name))
    if family == "llama":  # the stored bytes themselves: ffn_gate's first block of row 0, layer 0
        reader = gguf_lib.GGUFReader(str(path))
        row = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight").data[0]
        gate = leaves["model/layers/mlp/gate_proj/kernel"].array  # [layer, in, out]: blocks along `in`
        assert gate.scale[0, 0, 0] == row[:2].view(np.float16)[0]
        if storage == "Q4_1":
            assert gate.min[0, 0, 0] == row[2:4].view(np.float16)[0]
    batch = text_batch(np.random.default_rng(0))
    ref, got = log_probs(float_lm.model, float_lm.params, batch), log_probs(kept.model, kept.params, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5)


def test_gguf_other_storage_types_are_requantized_to_int8_said_in_the_log(caplog):
    from prefix_jax import models

    with caplog.at_level("INFO", logger="prefix_jax"):
        kept = models.load_pretrained(str(_gguf_file("llama", "Q5_0")), quantize="gguf")
    leaves = dict(qz._with_aux_leaves(kept.params))
    contraction = lambda name: 0 if name.endswith("lm_head/kernel") else 1  # the head [D, V]: a scale per column
    assert all(leaf.array.qvalue.dtype == jnp.int8 and leaf.array.scale.shape[contraction(name)] == 1
               for name, leaf in leaves.items())
    assert {"embed_tokens/embedding", "lm_head/kernel"} <= set(leaves)
    assert any("not stored as Q8_0/Q4_0/Q4_1 blocks" in r.getMessage() and "(Q5_0)" in r.getMessage()
               for r in caplog.records)


def test_bad_quantize_on_load_is_one_line_naming_the_field(tiny_checkpoint):
    from prefix_jax import models

    with pytest.raises(qz.QuantizeError, match=r"^model.quantize='gguf' keeps a GGUF file's own blocks, but .* is "
                                               r"not a GGUF checkpoint; use model.quantize=int8 or int4\.$"):
        models.load_pretrained(str(tiny_checkpoint("llama")), quantize="gguf")
    with pytest.raises(qz.QuantizeError, match=r"^model.quantize_group_size=48 does not divide"):
        models.load_pretrained(str(tiny_checkpoint("llama")), quantize="int4", quantize_group_size=48)
