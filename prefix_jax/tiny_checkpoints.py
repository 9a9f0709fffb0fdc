"""Random tiny checkpoints in Hugging Face format, built without torch or network (offline demos, tests).

The weights come from our own Flax initialisation, written through the architecture's HF table (`models.params_to_hf`);
the tokenizer is the real GPT-2 byte-level BPE bundled in data/gpt2-tokenizer (plus a `<pad>` token
for encoder-decoders, which start decoding from it as T5 does).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax import models

BUNDLED_TOKENIZER = Path(__file__).resolve().parent.parent / "data" / "gpt2-tokenizer"
EOS = "<|endoftext|>"
PAD = "<pad>"
TINY_ARCHITECTURES = ("t5", "bart", "gpt2", "llama")


def bundled_gpt2_tokenizer(with_pad: bool, eos_after_text: bool) -> Any:
    """GPT-2's tokenizer from the bundled vocab/merges; optionally `<pad>` and an EOS appended on encode."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(str(BUNDLED_TOKENIZER / "vocab.json"), str(BUNDLED_TOKENIZER / "merges.txt"))
    backend = bpe._tokenizer
    if eos_after_text:
        eos_id = backend.token_to_id(EOS)
        backend.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A $B {EOS}",
                                                               special_tokens=[(EOS, eos_id)])
    kwargs = dict(bos_token=EOS, eos_token=EOS, unk_token=EOS)
    if with_pad:
        kwargs["pad_token"] = PAD
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _tiny_hf_config(architecture: str, tokenizer: Any) -> Any:
    import transformers

    if architecture == "t5":
        return transformers.T5Config(
            vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id)
    if architecture == "bart":
        return transformers.BartConfig(
            vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
            dropout=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    if architecture == "gpt2":
        return transformers.GPT2Config(
            vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4, embd_pdrop=0.0,
            resid_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    if architecture == "llama":  # grouped-query attention (4 heads, 2 K/V heads), untied head
        return transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    raise ValueError(f"model.create_tiny={architecture!r}: tiny checkpoints exist for {TINY_ARCHITECTURES}.")


def _dummy_batch() -> dict[str, jax.Array]:
    ones = jnp.ones((1, 4), jnp.int32)
    return {"source_ids": ones, "source_mask": ones, "target_ids": ones, "target_mask": ones}


def _unit_norm_token_rows(params: dict, model_type: str) -> dict:
    """GPT-2/BART's init (std 0.02) leaves a random tiny LM's tied-head logits so flat that no prefix can
    move them; rows of norm ~1 give logits of unit scale, so a demo's loss visibly falls. (T5 already
    starts at std 1 with its d_model**-0.5 output scaling.)"""
    table = {"gpt2": "wte", "bart": "shared"}.get(model_type)
    if table is None:
        return params
    embedding = params[table]["embedding"]
    scale = 1.0 / (float(jnp.std(embedding)) * np.sqrt(embedding.shape[-1]))
    return {**params, table: {**params[table], "embedding": embedding * scale}}


# Written into every directory this module builds; only such a directory is ever reused as a tiny checkpoint.
MARKER = ".prefix_jax_tiny"


class TinyCheckpointError(ValueError):
    """`model.create_tiny` was pointed at a directory this module did not build."""


def build_tiny_checkpoint(directory: str | Path, architecture: str, seed: int = 0) -> Path:
    """Writes a random tiny checkpoint (config, safetensors, tokenizer) to `directory`, which must not exist yet.

    A directory built here before (it holds `MARKER`) is reused as it is. Anything else at `directory` is
    refused and left untouched: this function never deletes or overwrites a file it did not create.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    if (directory / MARKER).is_file():
        return directory
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        raise TinyCheckpointError(
            f"model.create_tiny={architecture!r} would build a random model at model.name_or_path={str(directory)!r}, "
            "which already exists and was not built by prefix_jax; it was left untouched. To train on the model "
            "there, set --config.model.create_tiny=''; for a tiny demo model, choose a new directory.")
    encoder_decoder = architecture in ("t5", "bart")
    tokenizer = bundled_gpt2_tokenizer(with_pad=encoder_decoder, eos_after_text=encoder_decoder)
    hf_config = _tiny_hf_config(architecture, tokenizer)
    arch = models.architecture(hf_config.model_type)
    config = arch.Config.from_hf(hf_config, set())
    params = jax.jit(arch.Model(config).init)(jax.random.PRNGKey(seed), _dummy_batch())["params"]  # one compile, not one per op
    params = _unit_norm_token_rows(params, hf_config.model_type)
    tensors = models.params_to_hf(params, config)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        hf_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(staging / "model.safetensors"))
        (staging / MARKER).write_text(f"random tiny {architecture}, seed {seed}\n")
        staging.chmod(0o755)
        try:
            os.rename(staging, directory)  # atomic; replaces only an empty directory, never a non-empty one
        except OSError:
            if not (directory / MARKER).is_file():  # not another process of this run that got there first
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # our own staging directory, never the target
        raise
    return directory
