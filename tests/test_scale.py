"""Scale: the (data, fsdp, model) mesh, partition rules, sharded loading, remat policies, gradient accumulation.

Multi-device checks run tests/scale_worker.py in a subprocess with 8 simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import REPO, cpu_env, run_processes
from jax.sharding import AbstractMesh, PartitionSpec
from tolerances import F32_REORDERED_RTOL

from prefix_jax import models, partitioning, sharding, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.metrics_file import read_metrics
from prefix_jax.models import common, t5
from prefix_jax.tiny_checkpoints import TINY_ARCHITECTURES, _dummy_batch, _tiny_hf_config, bundled_gpt2_tokenizer
MESHES = [(2, 2, 2), (1, 8, 1), (1, 1, 8), (2, 4, 1), (1, 2, 4), (8, 1, 1)]


def param_shapes(architecture: str, **hf_overrides) -> tuple:
    """Abstract params of the tiny `architecture` (no arrays allocated) and its module."""
    hf = _tiny_hf_config(architecture, bundled_gpt2_tokenizer(with_pad=architecture != "gpt2", eos_after_text=False))
    for k, v in hf_overrides.items():
        setattr(hf, k, v)
    arch = models.architecture(architecture)
    names = {"lm_head.weight"} if hf_overrides.get("tie_word_embeddings") is False else set()
    cfg = arch.Config.from_hf(hf, names)
    shapes = jax.eval_shape(lambda: arch.Model(cfg).init(jax.random.PRNGKey(0), _dummy_batch()))["params"]
    return shapes, arch


VARIANTS = [(a, {}) for a in TINY_ARCHITECTURES] + [("t5", dict(feed_forward_proj="gated-gelu", is_gated_act=True,
                                                                 dense_act_fn="gelu_new", tie_word_embeddings=False))]


@pytest.mark.parametrize("architecture,overrides", VARIANTS, ids=[a + ("_v11" if o else "") for a, o in VARIANTS])
def test_every_lm_leaf_gets_a_valid_spec_under_every_strategy(architecture, overrides):
    shapes, arch = param_shapes(architecture, **overrides)
    axes = partitioning.logical_axes(shapes, arch.PARAM_AXES)
    for strategy in partitioning.STRATEGIES:
        for shape in MESHES:
            mesh = AbstractMesh(shape, sharding.MESH_AXES)
            specs = partitioning.lm_partition_specs(shapes, arch.PARAM_AXES, strategy, mesh)
            flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
            assert len(flat) == len(jax.tree.leaves(shapes))
            sharded = 0
            for leaf, spec, names in zip(jax.tree.leaves(shapes), flat,
                                         jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
                assert isinstance(spec, PartitionSpec) and len(spec) <= leaf.ndim
                used = [a for a in spec if a is not None]
                assert len(used) == len(set(used)), spec  # a mesh axis shards one dim at most
                for dim, axis, name in zip(leaf.shape, spec, names):
                    if axis is not None:
                        assert name != "layers" and dim % mesh.shape[axis] == 0, (leaf.shape, spec)
                        assert axis == partitioning.STRATEGIES[strategy][name]
                sharded += bool(used)
            mapped = [(v,) if isinstance(v, str) else v for v in partitioning.STRATEGIES[strategy].values()]
            if any(mesh.shape[a] > 1 for axes in mapped for a in axes):
                assert sharded >= 3, (strategy, shape, sharded)  # the big kernels and embeddings are split
            else:
                assert sharded == 0, (strategy, shape, sharded)


def test_an_lm_leaf_without_a_rule_or_with_a_wrong_rule_raises_naming_it():
    shapes, arch = param_shapes("t5")
    rules = [r for r in arch.PARAM_AXES if "ffn" not in r[0]]
    with pytest.raises(partitioning.PartitionError, match=r"decoder/layers/ffn/wi/kernel .*matches no PARAM_AXES"):
        partitioning.lm_partition_specs(shapes, rules, "fsdp", AbstractMesh((1, 8, 1), sharding.MESH_AXES))
    wrong_rank = [(r"shared/embedding", ("vocab",))] + list(arch.PARAM_AXES)
    with pytest.raises(partitioning.PartitionError, match="shared/embedding has shape"):
        partitioning.logical_axes(shapes, wrong_rank)
    with pytest.raises(partitioning.PartitionError, match="mesh.lm_partitioning"):
        partitioning.lm_partition_specs(shapes, arch.PARAM_AXES, "zero3", AbstractMesh((8, 1, 1), sharding.MESH_AXES))


def test_a_dimension_that_does_not_divide_its_mesh_axis_is_replicated_with_a_log_line(caplog):
    shapes, arch = param_shapes("gpt2")
    shapes = {**shapes, "wte": {"embedding": jax.ShapeDtypeStruct((50257, 64), jnp.float32)}}  # GPT-2's odd vocab
    mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
    with caplog.at_level(logging.INFO, logger="prefix_jax"):
        specs = partitioning.lm_partition_specs(shapes, arch.PARAM_AXES, "fsdp_tensor", mesh)
    assert specs["wte"]["embedding"] == PartitionSpec(None, "fsdp")  # vocab replicated, embed still split
    assert any("wte/embedding" in r.message and "vocab" in r.message for r in caplog.records)
    # 4 heads over a model axis of 8: heads replicated, d_model still split over fsdp.
    specs = partitioning.lm_partition_specs(shapes, arch.PARAM_AXES, "fsdp_tensor",
                                            AbstractMesh((1, 1, 8), sharding.MESH_AXES))
    assert specs["transformer"]["h"]["attn"]["query"]["kernel"] == PartitionSpec()
    assert prefix_lib.kv_spec(4, AbstractMesh((1, 2, 4), sharding.MESH_AXES)) == PartitionSpec(None, "model")
    assert prefix_lib.kv_spec(4, AbstractMesh((1, 1, 8), sharding.MESH_AXES)) == PartitionSpec()


def test_mesh_shape_resolves_minus_one_and_rejects_bad_shapes():
    assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    for bad in [(3, 1, 1), (-1, 3, 1), (-1, -1, 1), (8, 1), (0, 8, 1)]:
        with pytest.raises(ValueError, match=r"mesh\.shape"):
            sharding.resolve_mesh_shape(bad, 8)
    mesh = sharding.make_mesh((-1, 1, 1))
    assert mesh.axis_names == sharding.MESH_AXES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        sharding.check_batch_size(6, mesh, grad_accum_steps=4)


def test_remat_setting_accepts_policies_and_booleans():
    assert [common.remat_policy(v) for v in (False, True, "none", "full", "minimal", "True", "false")] == [
        "none", "full", "none", "full", "minimal", "full", "none"]
    with pytest.raises(ValueError, match="model.remat='sometimes'"):
        common.remat_policy("sometimes")


# --- remat and gradient accumulation (one device) -------------------------------------------------------------


def tiny_t5(layers: int = 2, dropout: float = 0.0):
    from transformers import T5Config

    hf = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=128, num_layers=layers, num_heads=4, dropout_rate=dropout,
                  decoder_start_token_id=0, relative_attention_num_buckets=8)
    cfg = t5.Config.from_hf(hf, set())
    batch = {k: jnp.ones((1, 4), jnp.int32) for k in ("source_ids", "source_mask", "target_ids", "target_mask")}
    return cfg, jax.jit(t5.Model(cfg).init)(jax.random.PRNGKey(0), batch)["params"]  # eager init is slow


def uneven_batch(size: int, source: int = 16, target: int = 8, seed: int = 0) -> dict:
    """Rows with very different numbers of real target tokens (1 .. target), so micro-batch means would differ."""
    rng = np.random.default_rng(seed)
    target_len = np.where(np.arange(size) % 4 == 0, target, 1)
    source_len = rng.integers(2, source + 1, size)
    return {"source_ids": jnp.asarray(rng.integers(2, 64, (size, source)), jnp.int32),
            "source_mask": jnp.asarray(np.arange(source)[None] < source_len[:, None], jnp.int32),
            "target_ids": jnp.asarray(rng.integers(2, 64, (size, target)), jnp.int32),
            "target_mask": jnp.asarray(np.arange(target)[None] < target_len[:, None], jnp.int32)}


def spec_for(cfg) -> prefix_lib.PrefixSpec:
    return prefix_lib.PrefixSpec(length=4, placements=("encoder", "decoder", "cross"), geometry=cfg.prefix_geometry(),
                                 hidden_size=cfg.d_model, mlp_hidden=16)


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients_and_order_temp_memory():
    from transformers import GPT2Config

    from prefix_jax.models import gpt2

    cfg = gpt2.Config.from_hf(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=6, n_head=4, embd_pdrop=0.0,
                                         resid_pdrop=0.0, attn_pdrop=0.0), set())
    batch = uneven_batch(8, source=24, target=16)
    lm_params = jax.jit(gpt2.Model(cfg).init)(jax.random.PRNGKey(0), batch)["params"]
    spec = prefix_lib.PrefixSpec(length=4, placements=("decoder",), geometry=cfg.prefix_geometry(),
                                 hidden_size=cfg.n_embd, mlp_hidden=16)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    grads, temp = {}, {}
    for policy in common.REMAT_POLICIES:
        model = gpt2.Model(dataclasses.replace(cfg, remat=policy))
        fn = jax.jit(jax.grad(lambda p, lm, b: train_steps.batch_loss(model, spec, p, lm, b, None)[0]))
        temp[policy] = fn.lower(params, lm_params, batch).compile().memory_analysis().temp_size_in_bytes
        grads[policy] = fn(params, lm_params, batch)
    for policy in ("full", "minimal"):
        for a, b in zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    assert temp["none"] > temp["minimal"] > temp["full"], temp


@pytest.mark.slow
def test_gradient_accumulation_with_uneven_token_counts_equals_one_big_step():
    cfg, lm_params = tiny_t5(layers=1)
    model = t5.Model(cfg)
    spec = spec_for(cfg)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    # Plain SGD: the update is the gradient itself (Adam's first step, g / |g|, would amplify rounding).
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    batch = uneven_batch(16)
    results = {}
    for steps in (1, 4):
        step = train_steps.jit_train_step(model, spec, tx, schedule, grad_accum_steps=steps)
        state = train_steps.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(2))
        results[steps] = step(state, lm_params, batch)
    (big_state, big), (acc_state, acc) = results[1], results[4]
    assert float(acc["tokens"]) == float(big["tokens"]) == float(batch["target_mask"].sum())
    np.testing.assert_allclose(acc["loss"], big["loss"], rtol=2e-6)
    np.testing.assert_allclose(acc["grad_norm"], big["grad_norm"], rtol=F32_REORDERED_RTOL)
    for start, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(acc_state.params),
                           jax.tree.leaves(big_state.params)):
        grad_acc, grad_big = start - a, start - b
        np.testing.assert_allclose(grad_acc, grad_big, rtol=F32_REORDERED_RTOL,
                                   atol=F32_REORDERED_RTOL * float(jnp.max(jnp.abs(grad_big))))
    # A mean of micro-batch means is not the batch mean when token counts differ: the check can tell them apart.
    micro = train_steps.micro_batches(batch, 4)
    loss = jax.jit(lambda b: train_steps.batch_loss(model, spec, params, lm_params, b, None))
    means = [loss(jax.tree.map(lambda x: x[j], micro)) for j in range(4)]
    assert abs(np.mean([float(t / c) for t, c in means]) - float(big["loss"])) > 1e-3


# --- several devices (subprocesses) ----------------------------------------------------------------------------


def env(devices: int) -> dict:
    """A scale check's environment: `devices` CPU devices, the repository importable (for scale_worker.py)."""
    return cpu_env(devices, PYTHONPATH=str(REPO))


def run_worker(check: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "tests/scale_worker.py"), check, str(root)], env=env(8),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scale-models")


@pytest.mark.slow
def test_sharded_loading_equals_the_loader_bitwise_reading_only_each_shard(models_root):
    """(2,4,1) and (2,1,4); T5 v1.0/v1.1, BART (also split over two files), GPT-2 (also without `transformer.`,
    and stored in bfloat16), Llama, each loaded as float32 and bfloat16."""
    report = run_worker("loading", models_root)
    assert len(report) == 2 * 8 * 2
    assert all(r["sharded_leaves"] >= 5 for r in report.values())


@pytest.mark.slow
def test_quantize_on_load_into_shards_equals_quantize_after_load_bitwise(models_root):
    """Llama and GPT-2, int8 and int4, meshes (1,8,1) (fsdp: kernels split along their contraction), (1,1,4)
    (tensor) and (2,2,2): every quantized leaf equals the one-device host load and today's float load + quantize,
    bitwise; every array the loader placed is a quantized part or a float non-kernel (no float kernel)."""
    report = run_worker("quantized_loading", models_root)
    assert len(report) == 2 * 2 * 3 and all(r["sharded_int_leaves"] >= 3 for r in report.values())


@pytest.mark.slow  # 9 compiled steps on 8 devices
def test_a_quantized_vocabulary_split_along_its_rows_is_never_gathered_whole_in_the_step(models_root):
    """A 3000-row Llama, int8 / int4 / GGUF Q4_1 (kept) vocabulary matrices (an untied head [D, V], a tied table
    [V, D]) under fsdp, tensor and both: each is split along its rows, the optimized HLO of the train step has no
    all-gather (all-to-all, collective permute) of the vocabulary's rows (the lookup is a local gather + all-reduce
    of the rows, the head reads each block's rows where they lie), and the losses are one device's. Reading the
    head in blocks of consecutive rows instead all-gathers the whole int8 head (s8[32,4096] and its scales
    f32[1,4096] on a 4096-row vocabulary, measured)."""
    report = run_worker("quantized_vocab_step", models_root)
    for case, r in report.items():
        print(case, r["vocab_axes"], r["losses"], r.get("max_loss_rel_diff"))
        assert not r["vocab_sized_collectives"], (case, r["vocab_sized_collectives"])
        if "(1, 1, 1)" not in case:
            assert len(r["vocab_axes"]) >= 2 and all(r["vocab_axes"].values()), (case, r["vocab_axes"])
            assert r["max_loss_rel_diff"] <= F32_REORDERED_RTOL, (case, r["max_loss_rel_diff"])
    assert len(report) == 5 + 4


@pytest.mark.slow
def test_training_on_sharded_meshes_matches_one_device(models_root):
    """(8,1,1), (2,4,1), (2,1,4), (1,2,4): losses, prefix gradients, eval loss (dropout on), LM unchanged."""
    report = run_worker("training", models_root)
    for shape in ("(8, 1, 1)", "(2, 4, 1)", "(2, 1, 4)", "(1, 2, 4)"):
        assert report[shape]["max_loss_rel_diff"] < F32_REORDERED_RTOL


@pytest.mark.slow
def test_fsdp_divides_the_step_argument_memory_and_hlo_does_not_grow_with_the_lm(models_root):
    """compile().memory_analysis(): per-device argument bytes under fsdp=4 ~ 1/4 of replicated; the lowered
    sharded step of a 100x larger LM is no larger (the LM is an argument, never a constant)."""
    report = run_worker("memory", models_root)
    assert 0.24 < report["ratio"] < 0.3
    assert report["hlo_chars"]["large"] < 1.05 * report["hlo_chars"]["small"] + 10_000


@pytest.mark.slow
def test_greedy_and_beam_from_the_sharded_lm_equal_replicated(models_root):
    report = run_worker("generation", models_root)
    assert set(report) == {"t5", "gpt2"}


@pytest.mark.slow
def test_two_processes_with_fsdp_across_them_match_one_device(tiny_t5_dir, tmp_path):
    """train.py as 2 processes x 4 devices, mesh (1, 8, 1): the LM is split across the processes."""
    model_dir = tiny_t5_dir
    base = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/t5_offline.py"),
            f"--config.model.name_or_path={model_dir}", "--config.model.create_tiny=", "--config.train.steps=3",
            "--config.train.batch_size=8", "--config.train.log_every=1", "--config.optim.warmup_steps=1",
            "--config.data.max_train_examples=64", "--config.data.max_eval_examples=16",
            "--config.data.max_source_length=32", "--config.data.max_target_length=16", "--config.eval.generate=False"]
    one = subprocess.run(base + [f"--config.train.workdir={tmp_path / 'one'}"], env=env(1), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    outputs = run_processes(base + [f"--config.train.workdir={tmp_path / 'two'}", "--config.mesh.shape=(1, 8, 1)"],
                            num_processes=2, devices_each=4, PYTHONPATH=str(REPO))
    for returncode, _, err in outputs:
        assert returncode == 0, err[-3000:]
    losses = lambda w: [row["loss"] for row in read_metrics(w) if "loss" in row]
    evals = lambda w: [row["eval_loss"] for row in read_metrics(w) if "eval_loss" in row]
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=F32_REORDERED_RTOL)
    np.testing.assert_allclose(evals(tmp_path / "two"), evals(tmp_path / "one"), rtol=F32_REORDERED_RTOL)
    # Each process read only its devices' blocks: about half of the checkpoint (replicated norms/biases twice).
    for _, _, err in outputs:
        line = next(l for l in err.splitlines() if "LM loaded into its shards" in l)
        read, total = _read_bytes(line)
        assert 0.4 * total < read < 0.6 * total, line


def _read_bytes(line: str) -> tuple[int, int]:
    numbers = [int(w) for w in line.replace(",", " ").split() if w.isdigit()]
    return numbers[-2], numbers[-1]
