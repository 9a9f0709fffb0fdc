"""Checks of tests/test_scale.py that need several (simulated) devices; run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8. `python tests/scale_worker.py CHECK MODELS_DIR`
prints one JSON line of measurements and exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tolerances import F32_REORDERED_RTOL

from prefix_jax import hub, models, optim, partitioning, sharding, tiny_checkpoints, train_steps
from prefix_jax import prefix as prefix_lib
from prefix_jax.generate import GenerationConfig, make_generate_fn
from prefix_jax.models import hf_mapping, sharded_load

STRATEGY = "fsdp_tensor"


# --- checkpoints -------------------------------------------------------------------------------------------------


def build_checkpoints(root: Path) -> dict[str, Path]:
    """Tiny checkpoints covering each layout branch: T5 v1.0 (tied) and v1.1 (gated, own lm_head), BART split
    over two files with an index, GPT-2 with and without the `transformer.` prefix, and one stored in bfloat16."""
    from safetensors.numpy import load_file, save_file

    out = {arch: tiny_checkpoints.build_tiny_checkpoint(root / arch, arch) for arch in tiny_checkpoints.TINY_ARCHITECTURES}

    v11 = root / "t5_v11"
    if not (v11 / "model.safetensors").is_file():
        import transformers

        from prefix_jax.models import t5

        hf = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0)
        cfg = t5.Config.from_hf(hf, {"lm_head.weight"})
        batch = {k: jnp.ones((1, 4), jnp.int32) for k in ("source_ids", "source_mask", "target_ids", "target_mask")}
        params = t5.Model(cfg).init(jax.random.PRNGKey(0), batch)["params"]
        v11.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(v11)
        save_file(models.params_to_hf(params, cfg), str(v11 / "model.safetensors"))
    out["t5_v11"] = v11

    def rewrite(name: str, source: Path, convert) -> None:
        target = root / name
        if not (target / "config.json").is_file():
            target.mkdir(parents=True, exist_ok=True)
            (target / "config.json").write_text((source / "config.json").read_text())
            convert(load_file(source / "model.safetensors"), target)
        out[name] = target

    def two_files(tensors, target):
        names = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, part in halves.items():
            save_file({n: tensors[n] for n in part}, str(target / file))
        weight_map = {n: file for file, part in halves.items() for n in part}
        (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    rewrite("bart_index", out["bart"], two_files)
    rewrite("gpt2_bare", out["gpt2"], lambda t, d: save_file(
        {n.removeprefix("transformer."): x for n, x in t.items()}, str(d / "model.safetensors")))
    import ml_dtypes

    rewrite("gpt2_bf16", out["gpt2"], lambda t, d: save_file(
        {n: x.astype(ml_dtypes.bfloat16) for n, x in t.items()}, str(d / "model.safetensors")))
    return out


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    return sharding.make_mesh(shape, math.prod(shape))


# --- sharded loading ---------------------------------------------------------------------------------------------


class ReadSpy:
    """Wraps `hf_mapping.SafetensorsFiles.read` and records every slice read: (tensor name, elements read)."""

    def __init__(self):
        self.reads: list[tuple[str, int]] = []
        self._read = hf_mapping.SafetensorsFiles.read

    def __enter__(self):
        spy, read = self, self._read

        def recording(source, name, index):
            block = read(source, name, index)
            spy.reads.append((name, block.size))
            return block

        hf_mapping.SafetensorsFiles.read = recording
        return self

    def __exit__(self, *exc):
        hf_mapping.SafetensorsFiles.read = self._read


def check_loading(root: Path) -> dict:
    """Sharded loading == load_pretrained bitwise; a sharded leaf's shards are 1/4 of it; one read per block,
    none of them the full tensor for a sharded leaf."""
    checkpoints = build_checkpoints(root)
    references = {(name, dtype): models.load_pretrained(str(directory), dtype)
                  for name, directory in checkpoints.items() for dtype in ("float32", "bfloat16")}
    hf_sizes = {name: {n: x.size for n, x in hub.read_safetensors(directory).items()}
                for name, directory in checkpoints.items()}
    report = {}
    for shape in ((2, 4, 1), (2, 1, 4)):
        mesh = mesh_of(shape)
        for name, directory in checkpoints.items():
            for dtype in ("float32", "bfloat16"):
                reference = references[(name, dtype)]
                with ReadSpy() as spy:
                    lm = sharded_load.load_sharded(str(directory), mesh, STRATEGY, dtype)
                assert jax.tree.structure(lm.params) == jax.tree.structure(reference.params), name
                sources = hf_mapping.leaves(models.open_checkpoint(str(directory), dtype, lazy=True).table)
                expected_reads = 0
                sharded = 0
                for src, ours, ref in zip(sources, jax.tree.leaves(lm.params), jax.tree.leaves(reference.params)):
                    host = np.asarray(jax.device_get(ours))
                    assert host.dtype == ref.dtype and host.shape == ref.shape, (name, src)
                    assert np.array_equal(host.view(np.uint8), np.asarray(ref).view(np.uint8)), (name, src)
                    blocks = {tuple((s.start, s.stop) for s in index)
                              for index in ours.sharding.devices_indices_map(ours.shape).values()}
                    if isinstance(src, hf_mapping.FromHF):
                        expected_reads += len(src.names) * len(blocks)
                    if len(blocks) == 4:  # sharded 4 ways
                        sharded += 1
                        for shard in ours.addressable_shards:
                            assert shard.data.size * 4 == ours.size, (name, src, shard.data.shape)
                        if isinstance(src, hf_mapping.FromHF):
                            for tensor_name in src.names:
                                sizes = [n for t, n in spy.reads if t == tensor_name]
                                full = hf_sizes[name][tensor_name]
                                assert sizes and all(4 * n <= full for n in sizes), (name, tensor_name, sizes, full)
                assert len(spy.reads) == expected_reads, (name, len(spy.reads), expected_reads)
                assert sharded >= 5, (name, shape, sharded)
                report[f"{name}/{dtype}/{shape}"] = {"sharded_leaves": sharded, "reads": len(spy.reads)}
    return report


class PlacementSpy:
    """Wraps `jax.make_array_from_callback` (the one way the loader places arrays): the shape and dtype of each."""

    def __init__(self):
        self.placed: list[tuple[tuple[int, ...], str]] = []
        self._make = jax.make_array_from_callback

    def __enter__(self):
        def recording(shape, sharding, callback, *args, **kwargs):
            out = self._make(shape, sharding, callback, *args, **kwargs)
            self.placed.append((tuple(out.shape), str(out.dtype)))
            return out

        jax.make_array_from_callback = recording
        return self

    def __exit__(self, *exc):
        jax.make_array_from_callback = self._make


QUANTIZED_MESHES = ((1, 8, 1), (1, 1, 4), (2, 2, 2))  # fsdp over the contraction; tensor; both


def check_quantized_loading(root: Path) -> dict:
    """Quantize on load into shards == the one-device host load == quantize-after-load, bitwise, on meshes that split
    kernels along their contraction (fsdp) and their outputs (tensor); no float kernel is ever placed."""
    from prefix_jax import quantize as qz

    checkpoints = {arch: tiny_checkpoints.build_tiny_checkpoint(root / arch, arch) for arch in ("llama", "gpt2")}
    report = {}
    for arch, directory in checkpoints.items():
        float_lm = models.load_pretrained(str(directory))
        for mode in ("int8", "int4"):
            qmodel = qz.quantized_model(float_lm.model, float_lm.params, mode, 32)
            after = qz.quantize_params(qmodel, float_lm.params)  # today's order: float load, then quantize
            whole = models.load_pretrained(str(directory), quantize=mode, quantize_group_size=32)
            kernel_shapes = {tuple(leaf.array.qvalue.shape) for _, leaf in qz._with_aux_leaves(after)}
            for ours, ref in zip(jax.tree.leaves(whole.params), jax.tree.leaves(after)):
                assert ours.dtype == ref.dtype and np.array_equal(np.asarray(ours), np.asarray(ref)), (arch, mode)
            for shape in QUANTIZED_MESHES:
                with PlacementSpy() as spy:
                    lm = sharded_load.load_sharded(str(directory), mesh_of(shape), STRATEGY, quantize=mode,
                                                   quantize_group_size=32)
                assert jax.tree.structure(lm.params) == jax.tree.structure(after), (arch, mode, shape)
                for ours, ref in zip(jax.tree.leaves(lm.params), jax.tree.leaves(after)):
                    host = np.asarray(jax.device_get(ours))
                    assert host.dtype == ref.dtype and np.array_equal(host, np.asarray(ref)), (arch, mode, shape)
                floats = [(s, d) for s, d in spy.placed if s in kernel_shapes and "float" in d]
                assert not floats and len(spy.placed) == len(jax.tree.leaves(after)), (arch, mode, shape, floats)
                assert lm.float_fingerprint == whole.float_fingerprint
                split = sum(any(x.sharding.spec) for x in jax.tree.leaves(lm.params)
                            if jnp.issubdtype(x.dtype, jnp.integer))
                report[f"{arch}/{mode}/{shape}"] = {"sharded_int_leaves": split, "placed": len(spy.placed)}
                assert split >= 3, report
    return report


def check_process_loading(directory: Path, coordinator: str, process_id: int, mode: str = "none",
                          shape: tuple[int, int, int] = (1, 8, 1), embeddings: bool = True) -> dict:
    """One of 2 processes x 4 devices, mesh `shape` (default (1, 8, 1): the LM split across the processes). This
    process's shards equal `load_pretrained` (quantized on load with `mode`, the vocabulary matrices too with
    `embeddings`) bitwise, and it read only its devices' blocks (the bytes the loader logs)."""
    import logging

    sharding.initialize_distributed(coordinator, 2, process_id)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("prefix_jax")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lm = sharded_load.load_sharded(str(directory), mesh_of(shape), STRATEGY, quantize=mode, quantize_group_size=32,
                                   quantize_embeddings=embeddings)
    reference = models.load_pretrained(str(directory), quantize=mode, quantize_group_size=32,
                                       quantize_embeddings=embeddings)
    for ours, ref in zip(jax.tree.leaves(lm.params), jax.tree.leaves(reference.params)):
        for shard in ours.addressable_shards:
            assert np.array_equal(np.asarray(shard.data).astype(np.float32), ref[shard.index].astype(np.float32))
            assert shard.data.dtype == ref.dtype
    line = next(l for l in lines if "LM loaded into its shards" in l)
    read, total = _bytes_in(line)
    return {"process": process_id, "architecture": lm.config.architecture, "quantize": mode, "mesh": list(shape),
            "bytes_read": read, "total_bytes": total, "fraction": read / total, "log": line}


def _bytes_in(line: str) -> tuple[int, int]:
    numbers = [int(w) for w in line.replace(",", " ").split() if w.isdigit()]
    return numbers[-2], numbers[-1]


# --- training ----------------------------------------------------------------------------------------------------


def batches(vocab: int, steps: int, size: int = 8, source: int = 12, target: int = 6) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        source_len = rng.integers(3, source + 1, size)
        target_len = rng.integers(1, target + 1, size)
        out.append({"source_ids": rng.integers(2, vocab, (size, source)).astype(np.int32),
                    "source_mask": (np.arange(source)[None] < source_len[:, None]).astype(np.int32),
                    "target_ids": rng.integers(2, vocab, (size, target)).astype(np.int32),
                    "target_mask": (np.arange(target)[None] < target_len[:, None]).astype(np.int32)})
    return out


def train_on(directory: Path, shape: tuple[int, int, int], steps: int = 3) -> dict:
    """Losses, prefix gradients and eval loss of a few steps (dropout on) with the LM sharded on `shape`."""
    mesh = mesh_of(shape)
    lm = sharded_load.load_sharded(str(directory), mesh, STRATEGY, dropout_rate=0.1)
    spec = prefix_lib.PrefixSpec(length=4, placements=("encoder", "decoder", "cross"),
                                 geometry=lm.config.prefix_geometry(), hidden_size=lm.config.hidden_size,
                                 mlp_hidden=16, dropout=0.1)
    params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
    tx, schedule = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10)
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    lm_sharding = sharded_load.shardings_of(lm.params)
    shard_prefix = lambda prefix: prefix_lib.constrain_kv(prefix, mesh)
    step = train_steps.jit_train_step(lm.model, spec, tx, schedule, state_sharding=replicated, lm_sharding=lm_sharding,
                                   batch_sharding=batch_sharding, shard_prefix=shard_prefix)
    grad_fn = jax.jit(jax.grad(lambda p, lm_params, batch, rng: train_steps.batch_loss(
        lm.model, spec, p, lm_params, batch, rng, shard_prefix=shard_prefix)[0]),
        in_shardings=(replicated, lm_sharding, batch_sharding, replicated), out_shardings=replicated)
    eval_fn = train_steps.jit_eval_step(lm.model, spec, replicated, lm_sharding, batch_sharding, shard_prefix)
    lm_before = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), lm.params)
    data = [sharding.shard_batch(b, mesh) for b in batches(lm.config.vocab_size, steps + 1)]
    grads = grad_fn(sharding.replicate(params, mesh), lm.params, data[0], jax.random.PRNGKey(5))
    state = sharding.replicate(train_steps.init_state(params, tx, jax.random.PRNGKey(2)), mesh)
    losses = []
    for batch in data[:steps]:
        state, metrics = step(state, lm.params, batch)
        losses.append(float(metrics["loss"]))
    evaluated = jax.device_get(eval_fn(state.params, lm.params, data[steps]))
    lm_after = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), lm.params)
    unchanged = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lm_before), jax.tree.leaves(lm_after)))
    return {"losses": losses, "grads": [np.asarray(g).tolist() for g in jax.tree.leaves(jax.device_get(grads))],
            "eval_loss": float(evaluated["loss_sum"] / evaluated["tokens"]), "lm_unchanged": unchanged,
            "lm_sharded": any(len(x.sharding.spec) and any(x.sharding.spec) for x in jax.tree.leaves(lm.params))}


def check_training(root: Path) -> dict:
    directory = tiny_checkpoints.build_tiny_checkpoint(root / "t5", "t5")
    one = train_on(directory, (1, 1, 1))
    report = {"one_device_losses": one["losses"], "one_device_eval": one["eval_loss"]}
    for shape in ((8, 1, 1), (2, 4, 1), (2, 1, 4), (1, 2, 4)):
        run = train_on(directory, shape)
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=F32_REORDERED_RTOL)
        np.testing.assert_allclose(run["eval_loss"], one["eval_loss"], rtol=F32_REORDERED_RTOL)
        # Relative to each gradient leaf's scale: float32 sums in another order differ by ~1e-7 absolute.
        grad_diff = max(float(np.max(np.abs(np.subtract(a, b))) / np.max(np.abs(b)))
                        for a, b in zip(run["grads"], one["grads"]))
        for a, b in zip(run["grads"], one["grads"]):
            np.testing.assert_allclose(a, b, rtol=F32_REORDERED_RTOL,
                                       atol=F32_REORDERED_RTOL * float(np.max(np.abs(b))))
        assert run["lm_unchanged"], shape
        assert run["lm_sharded"] == (shape != (8, 1, 1)), shape
        report[str(shape)] = {"max_loss_rel_diff": float(np.max(np.abs(np.subtract(run["losses"], one["losses"]))
                                                                / np.abs(one["losses"]))),
                              "eval_rel_diff": abs(run["eval_loss"] - one["eval_loss"]) / one["eval_loss"],
                              "max_grad_rel_diff": grad_diff}
    return report


def check_memory(root: Path) -> dict:
    """Per-device argument bytes of the compiled step: fsdp=4 holds ~1/4 of the replicated LM."""
    directory = tiny_checkpoints.build_tiny_checkpoint(root / "t5", "t5")
    out = {}
    for name, shape in (("replicated", (1, 1, 1)), ("fsdp4", (1, 4, 1))):
        mesh = mesh_of(shape)
        lm = sharded_load.load_sharded(str(directory), mesh, STRATEGY)
        spec = prefix_lib.PrefixSpec(length=4, placements=("decoder",), geometry=lm.config.prefix_geometry(),
                                     hidden_size=lm.config.hidden_size, mlp_hidden=16)
        params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
        tx, schedule = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10)
        replicated = sharding.replicated(mesh)
        step = train_steps.jit_train_step(lm.model, spec, tx, schedule, state_sharding=replicated,
                                       lm_sharding=sharded_load.shardings_of(lm.params),
                                       batch_sharding=sharding.batch_sharding(mesh))
        state = sharding.replicate(train_steps.init_state(params, tx, jax.random.PRNGKey(2)), mesh)
        batch = sharding.shard_batch(batches(lm.config.vocab_size, 1)[0], mesh)
        analysis = step.lower(state, lm.params, batch).compile().memory_analysis()
        out[name] = int(analysis.argument_size_in_bytes)
        out["lm_bytes"] = sum(x.nbytes for x in jax.tree.leaves(lm.params))
    out["ratio"] = out["fsdp4"] / out["replicated"]
    assert 0.24 < out["ratio"] < 0.3, out
    out["hlo_chars"] = sharded_step_hlo_sizes()
    small, large = out["hlo_chars"]["small"], out["hlo_chars"]["large"]
    assert large < 1.05 * small + 10_000, out
    return out


def sharded_step_hlo_sizes() -> dict:
    """Text size of the lowered train step on mesh (2, 2, 2) for a small and a 100x larger T5 (abstract LM)."""
    from transformers import T5Config

    from prefix_jax.models import t5

    mesh = mesh_of((2, 2, 2))
    sizes = {}
    for name, (vocab, d_ff) in {"small": (64, 64), "large": (8192, 1024)}.items():
        cfg = t5.Config.from_hf(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=d_ff, num_layers=2, num_heads=4,
                                         decoder_start_token_id=0, relative_attention_num_buckets=8), set())
        model = t5.Model(cfg)
        batch = {k: jnp.asarray(v) for k, v in batches(vocab, 1)[0].items()}
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]
        lm_sharding = partitioning.lm_shardings(shapes, t5.PARAM_AXES, STRATEGY, mesh)
        lm_abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, lm_sharding)
        spec = prefix_lib.PrefixSpec(length=4, placements=("encoder", "decoder", "cross"),
                                     geometry=cfg.prefix_geometry(), hidden_size=32, mlp_hidden=16)
        params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
        tx, schedule = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10)
        state = sharding.replicate(train_steps.init_state(params, tx, jax.random.PRNGKey(2)), mesh)
        step = train_steps.jit_train_step(model, spec, tx, schedule, state_sharding=sharding.replicated(mesh),
                                       lm_sharding=lm_sharding, batch_sharding=sharding.batch_sharding(mesh))
        sizes[name] = len(step.lower(state, lm_abstract, sharding.shard_batch(batches(vocab, 1)[0], mesh)).as_text())
    return sizes


def check_generation(root: Path) -> dict:
    """Greedy and beam search from the sharded LM equal the one-device replicated LM token for token."""
    checkpoints = {arch: tiny_checkpoints.build_tiny_checkpoint(root / arch, arch) for arch in ("t5", "gpt2")}
    out = {}
    for arch, directory in checkpoints.items():
        tokens = {}
        for shape in ((1, 1, 1), (2, 2, 2), (1, 2, 4)):
            mesh = mesh_of(shape)
            lm = sharded_load.load_sharded(str(directory), mesh, STRATEGY)
            placements = ("encoder", "decoder", "cross") if lm.config.is_encoder_decoder else ("decoder",)
            spec = prefix_lib.PrefixSpec(length=3, placements=placements, geometry=lm.config.prefix_geometry(),
                                         hidden_size=lm.config.hidden_size, mlp_hidden=16)
            prefix = prefix_lib.materialize(sharding.replicate(prefix_lib.init_params(spec, jax.random.PRNGKey(3)),
                                                               mesh), spec)
            batch = batches(lm.config.vocab_size, 1, size=4)[0]
            source = sharding.shard_batch({"ids": batch["source_ids"], "mask": batch["source_mask"]}, mesh)
            for beams in (1, 3):
                generate = make_generate_fn(lm.model, GenerationConfig(max_new_tokens=6, num_beams=beams))
                tokens[(shape, beams)] = np.asarray(jax.device_get(generate(lm.params, prefix, source["ids"],
                                                                             source["mask"])))
        for (shape, beams), t in tokens.items():
            np.testing.assert_array_equal(t, tokens[((1, 1, 1), beams)], err_msg=f"{arch} {shape} beams={beams}")
        out[arch] = {"greedy": tokens[((1, 1, 1), 1)].tolist(), "beam": tokens[((1, 1, 1), 3)].tolist()}
    return out


# --- a quantized vocabulary matrix split along its rows, in the compiled step -----------------------------------

# Vocabulary rows that divide 8 devices, many times the kernels' bytes; 3000 = 2^3 x 3 x 5^3: no product of the
# step's other dimensions (batch 8, lengths 6 and 18, width 32, heads 4 x 8, MLP 48/64) is a multiple of 125, so a
# collective whose dimensions multiply to 3000 in a run holds vocabulary rows.
WIDE_VOCAB, WIDE_WIDTH = 3000, 32
# (checkpoint, model.quantize, mesh, strategy): fsdp, tensor, both; an untied head [D, V] and a tied table [V, D].
# gguf: the same Llama (MLP width 64) as a GGUF file of Q4_1 blocks (uint4 values, a scale and a min per 32), kept.
QUANTIZED_VOCAB_STEPS = (("untied", "int8", (1, 8, 1), "fsdp"), ("untied", "int8", (2, 1, 4), "tensor"),
                         ("untied", "int4", (1, 2, 4), "fsdp_tensor"), ("tied", "int8", (1, 8, 1), "fsdp"),
                         ("gguf", "gguf", (1, 8, 1), "fsdp"))
_COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-to-all|collective-permute)(-start)?\(")


def vocab_sized_collectives(hlo: str, vocab: int) -> list[str]:
    """The results of the all-gathers, all-to-alls and collective permutes of an optimized HLO text with a run of
    dimensions that multiply to `vocab` (a whole vocabulary matrix, or a whole row of its scales, in any view, made
    on each device)."""
    found = []
    for result, op, _ in _COLLECTIVE.findall(hlo):
        for shape in re.findall(r"\w+\[([\d,]*)\]", result):
            dims = [int(n) for n in shape.split(",") if n]
            if any(math.prod(dims[i:j]) == vocab for i in range(len(dims)) for j in range(i + 1, len(dims) + 1)):
                found.append(f"{op} {result}")
    return found


def _mesh_axes_of(x: jax.Array, dim: int) -> list[str]:
    """The mesh axes dimension `dim` of a placed array is split over."""
    spec = tuple(x.sharding.spec) + (None,) * x.ndim
    return [spec[dim]] if isinstance(spec[dim], str) else list(spec[dim] or ())


def check_quantized_vocab_step(root: Path) -> dict:
    """A Llama with a 4096-row vocabulary, its matrices quantized (`QUANTIZED_VOCAB_STEPS`), on 8 devices: the
    vocabulary matrices are split along their rows, the compiled train step's collectives never make a whole one
    (`vocab_sized_collectives`), and 2 steps give one device's losses."""
    import torch
    import transformers

    from gguf_fixtures import write_gguf

    def wide_llama(**fields) -> transformers.LlamaForCausalLM:
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
            "vocab_size": WIDE_VOCAB, "hidden_size": WIDE_WIDTH, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False, **fields})).eval()

    directories = {}
    for name, tied in (("untied", False), ("tied", True)):
        directories[name] = root / f"wide_vocab_{name}"
        if not (directories[name] / "config.json").exists():
            wide_llama(tie_word_embeddings=tied).save_pretrained(directories[name])
    directories["gguf"] = root / "wide_vocab_q4_1.gguf"
    if not directories["gguf"].exists():
        write_gguf(wide_llama(intermediate_size=64), directories["gguf"], "Q4_1")

    def run(name: str, mode: str, shape: tuple[int, int, int], strategy: str) -> dict:
        mesh = mesh_of(shape)
        lm = sharded_load.load_sharded(str(directories[name]), mesh, strategy, quantize=mode, quantize_group_size=16)
        spec = prefix_lib.PrefixSpec(length=4, placements=("decoder",), geometry=lm.config.prefix_geometry(),
                                     hidden_size=lm.config.hidden_size, mlp_hidden=16)
        params = prefix_lib.init_params(spec, jax.random.PRNGKey(1))
        tx, schedule = optim.make_optimizer(params, learning_rate=1e-2, total_steps=10)
        step = train_steps.jit_train_step(lm.model, spec, tx, schedule, state_sharding=sharding.replicated(mesh),
                                          lm_sharding=sharded_load.shardings_of(lm.params),
                                          batch_sharding=sharding.batch_sharding(mesh),
                                          shard_prefix=lambda prefix: prefix_lib.constrain_kv(prefix, mesh))
        state = sharding.replicate(train_steps.init_state(params, tx, jax.random.PRNGKey(2)), mesh)
        data = [sharding.shard_batch(b, mesh) for b in batches(WIDE_VOCAB, 2)]
        hlo = step.lower(state, lm.params, data[0]).compile().as_text()
        losses = []
        for batch in data:
            state, metrics = step(state, lm.params, batch)
            losses.append(float(metrics["loss"]))
        vocab_axes = {partitioning.path_name(p): _mesh_axes_of(x, x.shape.index(WIDE_VOCAB))  # split along rows?
                      for p, x in jax.tree_util.tree_flatten_with_path(lm.params)[0]
                      if x.ndim == 2 and WIDE_VOCAB in x.shape}
        return {"losses": losses, "vocab_axes": vocab_axes,
                "vocab_sized_collectives": vocab_sized_collectives(hlo, WIDE_VOCAB)}

    report = {}
    for name, mode, shape, strategy in QUANTIZED_VOCAB_STEPS:
        one = report.setdefault(f"{name}/{mode}/(1, 1, 1)", run(name, mode, (1, 1, 1), strategy))
        sharded = report[f"{name}/{mode}/{shape}/{strategy}"] = run(name, mode, shape, strategy)
        sharded["max_loss_rel_diff"] = float(np.max(np.abs(np.subtract(sharded["losses"], one["losses"]))
                                                    / np.abs(one["losses"])))
    return report


CHECKS = {"loading": check_loading, "training": check_training, "memory": check_memory,
          "generation": check_generation, "quantized_loading": check_quantized_loading,
          "quantized_vocab_step": check_quantized_vocab_step}

if __name__ == "__main__":
    check, root = sys.argv[1], Path(sys.argv[2])
    if check == "process_loading":  # DIRECTORY COORDINATOR PROCESS_ID [QUANTIZE [MESH [EMBEDDINGS]]]
        extra = sys.argv[5:]
        print(json.dumps(check_process_loading(root, sys.argv[3], int(sys.argv[4]), *extra[:1],
                                               *[tuple(json.loads(m)) for m in extra[1:2]],
                                               *[json.loads(e) for e in extra[2:3]])))
    else:
        print(json.dumps(CHECKS[check](root)))
