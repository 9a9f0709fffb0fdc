"""HF PEFT prefix-tuning adapters <-> our `Prefix`.

PEFT stores one tensor, `prompt_embeddings` `[P, num_layers * 2 * token_dim]`: the prefix-encoder
output, rows layer-major (key of layer l, then its value). How PEFT feeds it to the model:

* causal LM: layer l's self-attention gets block l. That is exactly our `unflatten` layout.
* seq2seq LM (since PEFT 0.14): only the decoder self-attention gets a prefix. PEFT doubles the
  row blocks and regroups them four at a time, so decoder layer i reads block `(2 * i) mod L`
  (for even L, layers i and i + L/2 share one); the cross-attention blocks are discarded and the
  encoder gets nothing. `prefix_from_peft(..., seq2seq=True)` reproduces that mapping exactly.

`export_peft` writes the other direction: a PEFT adapter directory (`adapter_config.json` with
`prefix_projection=false`, and `adapter_model.safetensors` holding `prompt_embeddings`) that
`PeftModel.from_pretrained` loads into the same behaviour, for the prefixes PEFT can represent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefix_jax.models.prefix_contract import DECODER, KV, Prefix, StackGeometry
from prefix_jax.prefix import flatten, unflatten

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"  # the one tensor PEFT saves for prefix tuning


def peft_layer_for_decoder_layer(layer: int, num_layers: int) -> int:
    """Which PEFT row block a seq2seq decoder layer reads (see module docstring)."""
    return (2 * layer) % num_layers


def prefix_from_peft(prompt_embeddings_PxE: np.ndarray, decoder: StackGeometry, seq2seq: bool) -> Prefix:
    """Our `Prefix` that makes a model behave as PEFT's prefix tuning does with these embeddings."""
    flat = jnp.asarray(prompt_embeddings_PxE, jnp.float32)
    if flat.shape[-1] != decoder.kv_size:
        raise ValueError(f"PEFT prompt_embeddings have {flat.shape[-1]} numbers per virtual token; this model's "
                         f"decoder needs 2*{decoder.num_layers}*{decoder.num_heads}*{decoder.head_dim}="
                         f"{decoder.kv_size} (PEFT assumes heads*head_dim == hidden size).")
    kv = unflatten(flat, decoder)
    if seq2seq:
        order = jnp.asarray([peft_layer_for_decoder_layer(i, decoder.num_layers) for i in range(decoder.num_layers)])
        kv = KV(kv.key[order], kv.value[order])
    return Prefix(kv={DECODER: kv})


class PeftExportError(ValueError):
    """A prefix that PEFT's prefix tuning cannot represent."""


def _peft_blocks(kv: KV, seq2seq: bool) -> KV:
    """Our per-layer decoder K/V -> the `num_layers` row blocks PEFT stores (inverse of `prefix_from_peft`)."""
    num_layers = kv.key.shape[0]
    if not seq2seq:
        return kv
    blocks = {}
    for layer in range(num_layers):
        block = peft_layer_for_decoder_layer(layer, num_layers)
        if block in blocks:
            twin = blocks[block]
            if not (np.array_equal(kv.key[layer], kv.key[twin]) and np.array_equal(kv.value[layer], kv.value[twin])):
                raise PeftExportError(f"PEFT's seq2seq layout makes decoder layers {twin} and {layer} share one prefix "
                                      f"(of {num_layers}), but this prefix gives them different K/V; PEFT cannot "
                                      "represent it (an odd decoder layer count, or tied layers, can).")
        else:
            blocks[block] = layer
    # Blocks no decoder layer reads (PEFT feeds them to cross-attention, then discards them): zeros.
    order = [blocks.get(b) for b in range(num_layers)]
    zeros = np.zeros_like(kv.key[0])
    pick = lambda x: np.stack([x[i] if i is not None else zeros for i in order])
    return KV(pick(np.asarray(kv.key)), pick(np.asarray(kv.value)))


def export_peft(prefix: Prefix, lm_config: Any, directory: str | Path, base_model_name_or_path: str) -> Path:
    """Writes `prefix` as a HF PEFT prefix-tuning adapter for the LM described by `lm_config`.

    PEFT can take a decoder-only LM's prefix, or an encoder-decoder's decoder self-attention prefix
    (with real tokens after the prefix, as HF places them). Anything else is a `PeftExportError`.
    """
    prefix = jax.device_get(prefix)
    if prefix.prompt_embeds is not None:
        raise PeftExportError("an embedding-only prompt (prefix.method='embedding_only') is PEFT prompt tuning, not "
                              "prefix tuning; export_peft writes prefix-tuning adapters only.")
    if prefix.infix:
        raise PeftExportError("prefix.method='infix' ([x; INFIX; y]) has no PEFT counterpart: PEFT puts the K/V "
                              "before the source.")
    others = sorted(set(prefix.kv) - {DECODER})
    if others:
        raise PeftExportError(f"PEFT prefix tuning has no {others[0]!r} placement (it gives "
                              f"{'an encoder-decoder' if lm_config.is_encoder_decoder else 'a decoder-only'} LM only "
                              f"the decoder self-attention prefix); export with prefix.placements=('decoder',).")
    if DECODER not in prefix.kv:
        raise PeftExportError("the prefix has no 'decoder' placement, the only one PEFT prefix tuning takes.")
    if not getattr(lm_config, "positions_after_prefix", True):
        raise PeftExportError(f"PEFT places {lm_config.architecture} tokens after the prefix, but this LM has "
                              "model.positions_after_prefix=False (the paper's layout); PEFT would shift positions.")
    geometry: StackGeometry = lm_config.prefix_geometry()[DECODER]
    seq2seq = bool(lm_config.is_encoder_decoder)
    kv = KV(np.asarray(prefix.kv[DECODER].key, np.float32), np.asarray(prefix.kv[DECODER].value, np.float32))
    embeddings = np.asarray(flatten(_peft_blocks(kv, seq2seq)), np.float32)  # [P, L * 2 * H * K]
    length = embeddings.shape[0]
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": length,
        "token_dim": geometry.num_heads * geometry.head_dim,  # PEFT reads head_dim as token_dim // heads
        "num_attention_heads": geometry.num_heads,
        "num_layers": geometry.num_layers,
        "num_transformer_submodules": 2 if seq2seq else 1,
        "encoder_hidden_size": geometry.num_heads * geometry.head_dim,
        "prefix_projection": False,  # the stored tensor is the prefix itself, no MLP
        "inference_mode": True,
    }
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_TENSOR: embeddings}, str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def load_peft(directory: str | Path, lm_config: Any) -> Prefix:
    """Reads a PEFT prefix-tuning adapter directory as our `Prefix` for the LM of `lm_config`.

    PEFT always saves the prefix itself (the MLP output when `prefix_projection` is on), so either kind loads.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{directory / ADAPTER_CONFIG}: peft_type={config.get('peft_type')!r}, expected "
                         "'PREFIX_TUNING'.")
    embeddings = load_file(str(directory / ADAPTER_WEIGHTS))[PEFT_TENSOR]
    geometry = lm_config.prefix_geometry()[DECODER]
    return prefix_from_peft(embeddings, geometry, seq2seq=bool(lm_config.is_encoder_decoder))
