"""What the rotary decoder-only families (Llama, Gemma, Phi-3) read alike from a `transformers` config and check alike."""

from __future__ import annotations

from typing import Any, Collection


def check_model_type(hf: Any, model_types: Collection[str], family: str) -> None:
    """Refuses a config of another family, or one that says its checkpoint is quantized (we load float tensors)."""
    if hf.model_type not in model_types:
        raise ValueError(f"model_type={hf.model_type!r} is not a {family} model ({tuple(model_types)}).")
    quantization = getattr(hf, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise ValueError(f"quantization_config ({method}) is not supported; load an unquantized (bf16/fp32) "
                         "checkpoint of the model (model.quantize quantizes it on load).")


def shared_fields(hf: Any, *, default_eos: int, default_tie: bool) -> dict[str, Any]:
    """The `Config` fields these families name and read the same way (HF's defaults where a field may be absent).

    `eos_token_id` may be a list in HF (several stop tokens); the first is the one we append to targets.
    """
    heads = hf.num_attention_heads
    eos = hf.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    return dict(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        rms_norm_eps=float(hf.rms_norm_eps),
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", default_tie)),
        attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
        bos_token_id=hf.bos_token_id,
        eos_token_id=eos if eos is not None else default_eos,
        pad_token_id=hf.pad_token_id if isinstance(hf.pad_token_id, int) else None,
    )


def check_heads_and_set_separator(config: Any) -> None:
    """Checks grouped-query heads divide; a `separator_token_id` of None becomes BOS (or EOS where there is none)."""
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"num_key_value_heads={config.num_key_value_heads} does not divide "
                         f"num_attention_heads={config.num_attention_heads}.")
    if config.separator_token_id is None:
        sep = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
        object.__setattr__(config, "separator_token_id", sep)
