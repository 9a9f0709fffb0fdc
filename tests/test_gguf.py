"""GGUF checkpoints: parity with transformers' own GGUF loading, every storage type, the tokenizer, bad files.

Tiny random models of each family are written as llama.cpp's converter writes them (`gguf_fixtures`), then
loaded by us and by `transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: the logits
must agree to float32 tolerance. The K-quants, which the `gguf` package reads but cannot write, are checked
kernel against kernel (the `gguf` package's numpy dequantization we use vs transformers' torch one) on
random blocks, and through the real files in the slow set (`test_real_weights.py`).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.integrations.gguf import dequant
from gguf_fixtures import EOS, FAMILIES, SEP, WRITABLE_TYPES, llama_cpp_permute, random_model, write_gguf
from tolerances import F32_ATOL

from prefix_jax import data
from prefix_jax import hub
from prefix_jax.models import gguf_checkpoint, load_pretrained

REPO = Path(__file__).resolve().parent.parent
SOURCE, TARGET = [5, 7, 9, 11, 13], [17, 19, 23, 29, EOS]


# Default set: every family in Q8_0, and llama also in F32 and Q4_1 (the demo's type); the rest of the matrix in
# the slow set, except GPT-2 beyond Q8_0 and F32: the storage types decode alike for every family (each one is
# checked on the others), and a GPT-2 file carries the 50k-token tokenizer that transformers needs to size it,
# which the gguf reader parses for ~4 s each time it opens the file (three times a case).
_GPT2_TYPES = ("Q8_0", "F32")
CASES = [pytest.param(family, qtype, marks=() if qtype == "Q8_0" or (family, qtype) in (("llama", "F32"),
                                                                                      ("llama", "Q4_1"))
                      else pytest.mark.slow)
         for family in FAMILIES for qtype in WRITABLE_TYPES if family != "gpt2" or qtype in _GPT2_TYPES]


def our_logits(lm) -> np.ndarray:
    one = lambda ids: jnp.asarray([ids])
    batch = dict(source_ids=one(SOURCE), source_mask=jnp.ones((1, len(SOURCE)), jnp.int32), target_ids=one(TARGET),
                 target_mask=jnp.ones((1, len(TARGET)), jnp.int32))
    return np.asarray(lm.model.apply({"params": lm.params}, batch))


def reference_logits(path: Path, sep: int = SEP) -> np.ndarray:
    """transformers' own GGUF loading of the same file, at our target slots (`[x; SEP; y[:-1]]`)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([SOURCE + [sep] + TARGET[:-1]])).logits.numpy()
    return logits[:, len(SOURCE):]


@pytest.mark.parametrize("family,qtype", CASES)
def test_logits_match_transformers_gguf_loading(family, qtype, tmp_path):
    path = write_gguf(random_model(family), tmp_path / f"{family}-{qtype}.gguf", qtype, tokenizer=family == "gpt2")
    lm = load_pretrained(str(path))
    assert lm.config.architecture == {"mistral": "llama"}.get(family, family)
    ours, ref = our_logits(lm), reference_logits(path, lm.config.separator_token_id)
    assert np.abs(ref).max() > 0.5  # weights large enough for the comparison to mean something
    assert np.abs(ours - ref).max() < F32_ATOL, (family, qtype)


def test_skipping_the_rope_unpermutation_breaks_parity(tmp_path, monkeypatch):
    """The planted bug the parity test exists for: llama.cpp's Q/K row order taken as HF's."""
    path = write_gguf(random_model("llama"), tmp_path / "llama.gguf", "F32")
    ref = reference_logits(path)
    monkeypatch.setattr(gguf_checkpoint, "unpermute_rope_rows", lambda w, num_heads: w)
    assert np.abs(our_logits(load_pretrained(str(path))) - ref).max() > 100 * F32_ATOL


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    assert np.array_equal(gguf_checkpoint.unpermute_rope_rows(llama_cpp_permute(w, 4), 4), w)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)


def test_a_directory_holding_one_gguf_and_bfloat16_params(tmp_path):
    path = write_gguf(random_model("qwen2"), tmp_path / "model.gguf", "BF16")
    lm = load_pretrained(str(tmp_path), param_dtype="bfloat16")
    assert lm.model_dir == path and lm.config.tie_word_embeddings and lm.config.qkv_bias
    assert lm.params["embed_tokens"]["embedding"].dtype == jnp.bfloat16


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_kernels_agree_with_transformers(qtype):
    """K-quants (read, never written, by the `gguf` package): its numpy kernel, which we use, against
    transformers' torch kernel, on random 256-value blocks with finite scales."""
    kind = gguf.GGMLQuantizationType[qtype]
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (8, block_bytes), dtype=np.uint8)
    half_scales = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype]
    for offset in half_scales:  # the blocks' float16 super-scales: finite, moderate
        raw[:, offset:offset + 2] = rng.uniform(-2, 2, (8, 1)).astype(np.float16).view(np.uint8)
    ours = gguf.quants.dequantize(raw, kind).reshape(-1)
    theirs = dequant.dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(kind)).numpy()
    assert ours.shape == (8 * block_values,) and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_tokenizer_from_gguf_metadata_matches_transformers(tmp_path):
    model = random_model("llama")
    model.resize_token_embeddings(50257)
    path = write_gguf(model, tmp_path / "tok.gguf", "F32", tokenizer=True)
    ours = data.load_tokenizer(str(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ("name : The Vaults | eatType : pub", " Café Adriatic, 3 stars.\n\nOK <|endoftext|>", "ünï 12345"):
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours.eos_token == "<|endoftext|>" and len(ours) == 50257


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _unsupported_type_file(tmp_path: Path) -> Path:
    path = write_gguf(random_model("llama"), tmp_path / "iq.gguf", "F32")
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "iq4.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama.") or key.startswith("tokenizer.") or key == "general.name":
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1]
                                 if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":  # 64 x 32 values as IQ4_NL blocks (18 bytes per 32 values)
            writer.add_tensor(t.name, np.zeros((64, 18), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(t.name, np.asarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "iq4.gguf"


def _truncated(tmp_path: Path) -> Path:
    path = write_gguf(random_model("llama"), tmp_path / "t.gguf", "Q8_0")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return path


def _other_architecture(tmp_path: Path) -> Path:
    path = write_gguf(random_model("llama"), tmp_path / "falcon.gguf", "F32", architecture="falcon")
    return path


BAD_FILES = [
    ("truncated", _truncated, ["t.gguf", "truncated"]),
    ("architecture", _other_architecture, ["falcon.gguf", "general.architecture='falcon'", "supported"]),
    ("storage-type", _unsupported_type_file, ["iq4.gguf", "blk.0.ffn_up.weight", "IQ4_NL", "supported"]),
]


@pytest.mark.parametrize("name,make,needles", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_gguf_is_one_line_naming_the_file(tmp_path, name, make, needles):
    path = make(tmp_path)
    with pytest.raises(hub.ModelNotFoundError) as caught:
        load_pretrained(str(path))
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message


@pytest.mark.slow  # a train.py subprocess per file
@pytest.mark.parametrize("name,make,needles", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_train_py_refuses_a_bad_gguf_and_writes_nothing(tmp_path, name, make, needles):
    (tmp_path / "model").mkdir()
    path = make(tmp_path / "model")
    before = _digest(tmp_path)
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/smollm2_e2e.py"),
                           f"--config.model.name_or_path={path}", f"--config.train.workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert all(n in errors[0] for n in needles), errors[0]
    assert not workdir.exists() and _digest(tmp_path) == before
