"""HF PEFT prefix-tuning adapters <-> our `Prefix`.

PEFT stores one tensor, `prompt_embeddings` `[P, num_layers * 2 * token_dim]`: the prefix-encoder
output, rows layer-major (key of layer l, then its value). How PEFT feeds it to the model:

* causal LM: layer l's self-attention gets block l. That is exactly our `unflatten` layout.
* seq2seq LM (since PEFT 0.14): only the decoder self-attention gets a prefix. PEFT doubles the
  row blocks and regroups them four at a time, so decoder layer i reads block `(2 * i) mod L`
  (for even L, layers i and i + L/2 share one); the cross-attention blocks are discarded and the
  encoder gets nothing. `prefix_from_peft(..., seq2seq=True)` reproduces that mapping exactly.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from prefix_jax.models.attention import KV
from prefix_jax.models.interface import DECODER, Prefix, StackGeometry
from prefix_jax.prefix import unflatten


def peft_layer_for_decoder_layer(layer: int, num_layers: int) -> int:
    """Which PEFT row block a seq2seq decoder layer reads (see module docstring)."""
    return (2 * layer) % num_layers


def prefix_from_peft(prompt_embeddings_PxN: np.ndarray, decoder: StackGeometry, seq2seq: bool) -> Prefix:
    """Our `Prefix` that makes a model behave as PEFT's prefix tuning does with these embeddings."""
    flat = jnp.asarray(prompt_embeddings_PxN, jnp.float32)
    if flat.shape[-1] != decoder.kv_size:
        raise ValueError(f"PEFT prompt_embeddings have {flat.shape[-1]} numbers per virtual token; this model's "
                         f"decoder needs 2*{decoder.num_layers}*{decoder.num_heads}*{decoder.head_dim}="
                         f"{decoder.kv_size} (PEFT assumes heads*head_dim == hidden size).")
    kv = unflatten(flat, decoder)
    if seq2seq:
        order = jnp.asarray([peft_layer_for_decoder_layer(i, decoder.num_layers) for i in range(decoder.num_layers)])
        kv = KV(kv.key[order], kv.value[order])
    return Prefix(kv={DECODER: kv})
