"""The one HF mapping per architecture (`models/hf_mapping.py`): whole loading, block (sharded) loading and export
are derived from one table, so for every family and variant they agree bitwise, the export is the checkpoint's
own bytes, a GGUF file reads as the same tensors, and one wrong table entry breaks all three paths at once."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from gguf_fixtures import random_model, write_gguf
from hf_fixtures import save_state_dict

from prefix_jax import models, sharding, tiny_checkpoints
from prefix_jax import hub
from prefix_jax.models import gpt2, hf_mapping, llama, phi3, sharded_load

REPO = Path(__file__).resolve().parent.parent
LLAMA_LIKE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _random(build) -> torch.nn.Module:
    """`build()` with every parameter random (norm scales and biases too)."""
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _hf(kind: str, head: bool = True, **fields):
    """A tiny random transformers model: `{kind}ForCausalLM`, or the bare `{kind}Model` (no `model.` prefix)."""
    config = getattr(transformers, f"{kind}Config")(**fields)
    return lambda: _random(lambda: getattr(transformers, f"{kind}ForCausalLM" if head else f"{kind}Model")(config))


HF_VARIANTS = {
    "t5_v11": lambda: _random(lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0))),
    "gpt2_bare": _hf("GPT2", head=False, vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "llama_untied_biases": _hf("Llama", **LLAMA_LIKE, num_key_value_heads=2, head_dim=16, attention_bias=True,
                               mlp_bias=True),
    "llama_bare": _hf("Llama", head=False, **LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": _hf("Qwen2", **LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": _hf("Qwen3", **LLAMA_LIKE, num_key_value_heads=2, head_dim=16),
    "phi3": _hf("Phi3", **LLAMA_LIKE, num_key_value_heads=2, pad_token_id=0),  # fused qkv_proj, gate_up_proj
}
CASES = list(tiny_checkpoints.TINY_ARCHITECTURES) + list(HF_VARIANTS)
# Checkpoints of the loading tests alone: an untied Llama whose vocabulary matrices are most of its bytes and whose
# vocabulary divides 8 devices (the tiny Llama's 50257 rows divide no mesh axis).
LOADING_VARIANTS = {"llama_wide_vocab": _hf("Llama", **{**LLAMA_LIKE, "vocab_size": 4096}, num_key_value_heads=2,
                                            tie_word_embeddings=False)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """case -> a checkpoint directory, built on first use."""
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            directory = tmp_path_factory.mktemp(case)
            if case in HF_VARIANTS or case in LOADING_VARIANTS:
                built[case] = save_state_dict({**HF_VARIANTS, **LOADING_VARIANTS}[case](), directory)
            else:
                built[case] = tiny_checkpoints.build_tiny_checkpoint(directory / "model", case)
        return built[case]

    return get


def halves(shape: tuple[int, ...]) -> list[hf_mapping.Bounds]:
    """Blocks that halve every even axis (what a mesh splitting each axis in two would ask for)."""
    per_axis = [((0, n // 2), (n // 2, n)) if n % 2 == 0 and n > 1 else ((0, n),) for n in shape]
    return list(itertools.product(*per_axis))


def load_by_blocks(opened: models.OpenCheckpoint, source: hf_mapping.TensorSource) -> dict:
    """Every leaf assembled from its blocks, each read alone (`hf_mapping.read_block`, as sharded loading does)."""
    def assemble(src):
        out = np.empty(src.shape, np.float32)
        for bounds in halves(src.shape):
            out[tuple(slice(a, b) for a, b in bounds)] = hf_mapping.read_block(source, src, bounds, np.float32)
        return out

    return jax.tree.map(assemble, opened.table, is_leaf=hf_mapping.is_leaf)


def assert_bitwise(a, b, what: str) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y))
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (what, path)


def three_paths(directory: Path) -> tuple[dict, dict, dict, dict]:
    """(whole load, block load, sharded load, export of the whole load) of one checkpoint."""
    whole = models.load_pretrained(str(directory))
    opened = models.open_checkpoint(str(directory), lazy=True)
    blocks = load_by_blocks(opened, opened.source)
    sharded = sharded_load.load_sharded(str(directory), sharding.make_mesh())
    return whole.params, blocks, sharded.params, hf_mapping.to_hf(opened.table, whole.params)


@pytest.mark.parametrize("case", CASES)
def test_whole_sharded_and_export_agree_bitwise(checkpoint, case):
    directory = checkpoint(case)
    whole, blocks, sharded, exported = three_paths(directory)
    assert_bitwise(blocks, whole, "blocks")
    assert_bitwise(sharded, whole, "sharded")
    original = hub.read_safetensors(directory)
    assert set(exported) == set(original)
    for name, x in original.items():
        assert exported[name].dtype == x.dtype and exported[name].tobytes() == x.tobytes(), name


def test_the_export_without_names_uses_the_canonical_prefixes(checkpoint):
    lm = models.load_pretrained(str(checkpoint("llama_bare")))
    exported = models.params_to_hf(lm.params, lm.config)
    assert "model.embed_tokens.weight" in exported and "lm_head.weight" not in exported


# --- GGUF: one more source of HF-named tensors ---


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3"])
def test_an_f32_gguf_reads_as_the_same_tensors_as_the_safetensors(family, tmp_path):
    """llama.cpp names, Llama's Q/K row permutation, GPT-2's transposes and Phi-3's fused attn_qkv / ffn_up (read
    by row blocks) undone through the table's GGUF column:
    an F32 GGUF loads bitwise as the safetensors of the same model, whole and by blocks."""
    model = random_model(family)
    path = write_gguf(model, tmp_path / f"{family}.gguf", "F32")
    model.save_pretrained(tmp_path / "hf")
    reference = models.load_pretrained(str(tmp_path / "hf")).params
    whole = models.load_pretrained(str(path)).params
    opened = models.open_checkpoint(str(path))
    assert_bitwise(whole, reference, "gguf whole")
    assert_bitwise(load_by_blocks(opened, opened.source), reference, "gguf blocks")
    assert_bitwise(sharded_load.load_sharded(str(path), sharding.make_mesh()).params, reference, "gguf sharded")


def test_a_quantized_gguf_block_reads_only_its_rows(tmp_path):
    path = write_gguf(random_model("llama"), tmp_path / "llama.gguf", "Q8_0")
    opened = models.open_checkpoint(str(path))
    assert_bitwise(load_by_blocks(opened, opened.source), models.load_pretrained(str(path)).params, "Q8_0 blocks")
    q = opened.table["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H, K]: heads 2..3 of layer 0
    before = opened.source.bytes_read
    hf_mapping.read_block(opened.source, q, ((0, 1), (0, q.shape[1]), (2, 4), (0, q.shape[3])), np.float32)
    stored = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
    assert opened.source.bytes_read - before == stored.data.nbytes // 2  # half the rows, all their columns


# --- One declaration: a planted bug shows on every path ---


def _replace_leaf(table: dict, path: tuple[str, ...], change) -> dict:
    table = jax.tree.map(lambda x: x, table, is_leaf=hf_mapping.is_leaf)  # a copy of the containers
    node = table
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = change(node[path[-1]])
    return table


PLANTED = {  # case -> (module, leaf path, the wrong entry)
    "llama": (llama, ("model", "layers", "self_attn", "o_proj", "kernel"),
              lambda src: dataclasses.replace(src, transpose=not src.transpose)),  # a square [64, 64] kernel
    "gpt2": (gpt2, ("transformer", "h", "attn", "key", "kernel"),
             lambda src: dataclasses.replace(src, offset=(0, 2 * src.split[0][0]))),  # key read from value's third
    "phi3": (phi3, ("model", "layers", "self_attn", "k_proj", "kernel"),  # keys read from the values' slice
             lambda src: dataclasses.replace(src, offset=(0, src.offset[1] + src.split[1][0] * src.split[1][1]))),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_one_wrong_table_entry_fails_whole_sharded_and_export_alike(checkpoint, case, monkeypatch):
    directory = checkpoint(case)
    reference = models.load_pretrained(str(directory)).params
    original = hub.read_safetensors(directory)
    module, path, wrong = PLANTED[case]
    right_table = module.hf_table
    monkeypatch.setattr(module, "hf_table", lambda cfg, names=None: _replace_leaf(right_table(cfg, names), path, wrong))
    whole, blocks, sharded, _ = three_paths(directory)
    exported = models.params_to_hf(reference, models.load_pretrained(str(directory)).config)
    differs = lambda params: not all(np.array_equal(np.asarray(a), b) for a, b in
                                     zip(jax.tree.leaves(params), jax.tree.leaves(reference)))
    assert differs(whole) and differs(blocks) and differs(sharded)
    assert any(not np.array_equal(exported[name], x) for name, x in original.items())


# --- Llama loads straight into its shards across processes ---


# (checkpoint, model.quantize, mesh, at most this fraction of the checkpoint read per process,
# model.quantize_embeddings). int4 in groups of 32 on fsdp=2: each process's contraction half holds whole groups
# (local). int8: a kernel's scale needs the whole contraction, so a process reads the full contraction of the
# output channels it holds: the documented price of exact per-channel scales (`sharded_load.load_sharded`). The
# vocabulary matrices, quantized by default, are split by rows (`quantize.quantized_param_axes`) over the mesh axes
# their rows divide: the wide-vocabulary Llama's 4096 rows over fsdp=8, so each process reads half of them
# (measured 51.9%: its kernels whole; 99.0% when fsdp split their width, an int8 row's scale needing the whole
# row). The tiny Llama's 50257 rows divide no mesh axis: fsdp splits their width instead, where int4's groups of 32
# stay local (measured 50.0% / 50.1% / 51.9% per process for the three rows).
TWO_PROCESS_LOADS = [("llama", "none", (1, 8, 1), 0.6, True), ("llama", "int4", (1, 2, 4), 0.6, True),
                     ("llama_wide_vocab", "int8", (1, 8, 1), 0.6, True)]


@pytest.mark.slow  # two processes x 4 simulated devices
@pytest.mark.parametrize("case,mode,mesh,fraction,embeddings", TWO_PROCESS_LOADS)
def test_llama_on_two_processes_reads_only_its_slices(checkpoint, case, mode, mesh, fraction, embeddings):
    """2 processes x 4 devices, fsdp across the processes: each process's shards (quantized on load with `mode`)
    equal the whole load bitwise, and it read at most `fraction` of the checkpoint's bytes (printed)."""
    directory = checkpoint(case)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests/scale_worker.py"), "process_loading", str(directory),
                               f"127.0.0.1:{port}", str(i), mode, json.dumps(mesh), json.dumps(embeddings)],
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outputs:
        report = json.loads(out.strip().splitlines()[-1])
        print(f"process {report['process']} ({report['architecture']}, model.quantize={mode}, mesh {mesh}): read "
              f"{report['bytes_read']} of {report['total_bytes']} bytes ({report['fraction']:.1%})")
        assert report["architecture"] == "llama" and report["fraction"] <= fraction, report
