"""The architecture rows `test_architectures.py` runs its contract over: per family, its tiny HF models, how
HF is called for a reference, and which cases of each shared check run (and which only with -m slow).

Adding an architecture: one `Family` row here (a subclass of `EncoderDecoder` or `DecoderOnly` where the way
transformers is called differs) appended to `FAMILIES`, plus its own test file for what only it has.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import hf_decoder_cache, left_pad, save_state_dict, save_tiny
from tolerances import F32_ATOL
from transformers.cache_utils import DynamicCache

from prefix_jax.models import CROSS, DECODER, ENCODER

HIDDEN = 32  # d_model of every tiny model here


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch rows, source and target lengths, prefix length of a family's contract inputs."""
    B: int
    S: int
    T: int
    P: int


@dataclasses.dataclass(frozen=True)
class Case:
    """One case of a shared check: the tiny model it runs on, and what it varies.

    `config`: fields of our model config replaced for this case (e.g. positions_after_prefix); `left`: sources
    left-padded (decoder-only); `infix`: the prefix as an infix (decoder-only); `layers`/`projection`: the PEFT
    model's layer count (encoder-decoder) or prefix MLP (decoder-only); `gradients`: (decoder-only) PEFT's
    prefix parameters, loss and gradients are compared too, not only the logits of its `prompt_embeddings`;
    `beams`: (generation) the beam count.
    """
    variant: str
    config: tuple[tuple[str, object], ...] = ()
    left: bool = False
    infix: bool = False
    layers: int | None = None
    projection: bool = True
    gradients: bool = True
    beams: int = 1
    slow: bool = False

    @property
    def id(self) -> str:
        parts = [self.variant] + [f"{k}={v}" for k, v in self.config]
        parts += ["left"] * self.left + ["infix"] * self.infix
        parts += [f"layers={self.layers}"] * (self.layers is not None)
        parts += ["no_projection"] * (not self.projection) + ["logits_only"] * (not self.gradients)
        parts += [f"beams={self.beams}"] * (self.beams > 1)
        return "-".join(parts)


def case(variant: str, **kw) -> Case:
    kw["config"] = tuple(kw.get("config", {}).items())
    return Case(variant, **kw)


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One architecture family. `variants`: name -> builder of its (random, float32) tiny HF model and how it is
    saved; `expect`: per variant, fields our loaded config must have. The tuples of `Case`s say which cases of
    each shared check run; `missing_tensor`: (variant, tensor dropped from the file, the error must match).
    `stacked`: a regex for where the scanned layer stacks' params live. `generate` (decoder-only): cases of `generate` parity on a copy of the variant built by `random(variant, seed)`
    whose head row `eos` is steered (`eos_steer`) so that hypotheses end at various steps."""
    name: str
    hf_class: str
    encoder_decoder: bool
    placements: tuple[str, ...]
    sizes: Sizes
    vocab: int
    variants: dict[str, Callable[[], tuple[torch.nn.Module, Callable]]]
    logits: tuple[Case, ...]
    past_key_values: tuple[Case, ...]
    peft: tuple[Case, ...]
    padding_side: tuple[Case, ...]
    incremental: tuple[Case, ...]
    embedding_only: tuple[Case, ...]
    missing_tensor: tuple[str, str, str]
    expect: dict[str, dict] = dataclasses.field(default_factory=dict)
    padding_kv_seed: int = 0  # first seed of the random K/V the padding-side check uses
    tolerance: float = F32_ATOL  # ours vs HF / PEFT logits, absolute
    stacked: str = "model/layers/"  # the param paths of the scanned layer stack (their first axis is "layers")
    generate: tuple[Case, ...] = ()
    random: Callable[..., torch.nn.Module] | None = None
    eos: int | None = None
    eos_steer: float = 1.0

    def build(self, variant: str, directory: Path) -> torch.nn.Module:
        """The variant's HF model, saved into `directory`."""
        hf, save = self.variants[variant]()
        save(hf, directory)
        return hf

    def check_loaded(self, hf, lm, variant: str) -> None:
        """What loading must have read beyond what the logits show (e.g. config flags)."""
        for field, value in self.expect.get(variant, {}).items():
            assert getattr(lm.config, field) == value, (field, getattr(lm.config, field), value)


# --- encoder-decoder ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Seq2SeqInputs:
    """Right-padded sources and targets as torch tensors (HF's side) and jax arrays (ours)."""
    src: torch.Tensor
    smask: torch.Tensor
    tgt: torch.Tensor
    tmask: torch.Tensor

    def ours(self, left: bool = False) -> dict:
        assert not left, "encoder-decoder cases pad sources on the right"
        return dict(source_ids=jnp.asarray(self.src.numpy()), source_mask=jnp.asarray(self.smask.numpy()),
                    target_ids=jnp.asarray(self.tgt.numpy()), target_mask=jnp.asarray(self.tmask.numpy()))

    @property
    def valid(self) -> np.ndarray:
        return self.tmask.numpy()


@dataclasses.dataclass(frozen=True, eq=False)
class EncoderDecoder(Family):
    lowest_id: int = 2  # token ids drawn from [lowest_id, vocab)

    def batch(self, seed: int) -> Seq2SeqInputs:
        B, S, T = self.sizes.B, self.sizes.S, self.sizes.T
        g = torch.Generator().manual_seed(seed)
        src = torch.randint(self.lowest_id, self.vocab, (B, S), generator=g)
        smask = torch.ones(B, S, dtype=torch.long)
        smask[1, 7:] = 0
        smask[2, 3:] = 0
        tgt = torch.randint(self.lowest_id, self.vocab, (B, T), generator=g)
        tmask = torch.ones(B, T, dtype=torch.long)
        tmask[0, 4:] = 0
        return Seq2SeqInputs(src, smask, tgt, tmask)

    def peft_base(self, layers: int | None) -> torch.nn.Module:
        """The HF model PEFT wraps (PEFT wants as many decoder as encoder layers, heads * head_dim == d_model)."""
        raise NotImplementedError

    def reference(self, hf, x: Seq2SeqInputs, kv=None, prompt=None) -> np.ndarray:
        """HF's logits: plain, given a decoder prefix `kv` (torch K, V `[L, H, P, K]`) as `past_key_values`, or
        given `prompt` `[P, D]` in front of the source embeddings."""
        raise NotImplementedError

    def peft_reference(self, peft_model, hf, x: Seq2SeqInputs) -> np.ndarray:
        raise NotImplementedError


def t5_config(**kw) -> transformers.T5Config:
    base = dict(vocab_size=99, d_model=HIDDEN, d_kv=12, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                decoder_start_token_id=0, relative_attention_num_buckets=8, relative_attention_max_distance=20)
    return transformers.T5Config(**{**base, **kw})


def _t5_v10():
    """T5 v1.0 layout: ReLU FFN, tied head with d_model**-0.5 scaling. d_kv*heads != d_model on purpose."""
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(t5_config(feed_forward_proj="relu")).eval(), save_tiny


def _t5_v11():
    """T5 v1.1 / Flan layout: gated-GELU FFN, its own lm_head, no output scaling."""
    torch.manual_seed(1)
    cfg = t5_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=2)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    # transformers 5 ties lm_head to the embedding even for v1.1 configs; real v1.1 checkpoints carry their own.
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.5)
    return hf, save_state_dict


@dataclasses.dataclass(frozen=True, eq=False)
class T5(EncoderDecoder):
    def peft_base(self, layers):
        torch.manual_seed(3)
        return transformers.T5ForConditionalGeneration(t5_config(d_kv=8, num_layers=layers,
                                                                 num_decoder_layers=layers)).eval()

    def reference(self, hf, x, kv=None, prompt=None):
        B, T, P = self.sizes.B, self.sizes.T, self.sizes.P
        with torch.no_grad():
            if kv is not None:
                k, v = kv
                return hf(input_ids=x.src, attention_mask=x.smask, decoder_input_ids=hf._shift_right(x.tgt),
                          decoder_attention_mask=torch.ones(B, P + T, dtype=torch.long),
                          past_key_values=hf_decoder_cache(k, v, B)).logits.numpy()
            if prompt is not None:
                embeds = torch.cat([prompt[None].expand(B, -1, -1), hf.shared(x.src)], dim=1)
                mask = torch.cat([torch.ones(B, P, dtype=torch.long), x.smask], dim=1)
                return hf(inputs_embeds=embeds, attention_mask=mask,
                          decoder_input_ids=hf._shift_right(x.tgt)).logits.numpy()
            return hf(input_ids=x.src, attention_mask=x.smask,
                      labels=x.tgt.masked_fill(x.tmask == 0, -100)).logits.numpy()

    def peft_reference(self, peft_model, hf, x):
        with torch.no_grad():
            return peft_model(input_ids=x.src, attention_mask=x.smask, decoder_input_ids=hf._shift_right(x.tgt),
                              decoder_attention_mask=torch.ones(self.sizes.B, self.sizes.T, dtype=torch.long)
                              ).logits.numpy()


def bart_config(**kw) -> transformers.BartConfig:
    base = dict(vocab_size=99, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return transformers.BartConfig(**{**base, **kw})


def random_bart(seed: int, **kw) -> transformers.BartForConditionalGeneration:
    torch.manual_seed(seed)
    hf = transformers.BartForConditionalGeneration(bart_config(**kw)).eval()
    with torch.no_grad():  # HF's init is 0.02 / zeros: make embeddings, norms and the logits bias matter
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layernorm" in name or "embed" in name or "shared" in name:
                p.add_(torch.randn_like(p) * 0.3)
        hf.final_logits_bias.normal_()
    return hf


@dataclasses.dataclass(frozen=True, eq=False)
class Bart(EncoderDecoder):
    """HF's decoder inputs are our targets shifted right after token 2, with the target mask shifted alike."""

    def hf_inputs(self, x: Seq2SeqInputs) -> dict:
        B = self.sizes.B
        dec = torch.cat([torch.full((B, 1), 2), x.tgt[:, :-1]], dim=1)
        dmask = torch.cat([torch.ones(B, 1, dtype=torch.long), x.tmask[:, :-1]], dim=1)
        return dict(input_ids=x.src, attention_mask=x.smask, decoder_input_ids=dec, decoder_attention_mask=dmask)

    def check_loaded(self, hf, lm, variant):
        super().check_loaded(hf, lm, variant)
        np.testing.assert_array_equal(lm.params["final_logits_bias"], hf.final_logits_bias[0].numpy())

    def peft_base(self, layers):
        return random_bart(3, encoder_layers=layers, decoder_layers=layers)

    def reference(self, hf, x, kv=None, prompt=None):
        B, P = self.sizes.B, self.sizes.P
        hf_in = self.hf_inputs(x)
        with torch.no_grad():
            if kv is not None:
                mask = torch.cat([torch.ones(B, P, dtype=torch.long), hf_in["decoder_attention_mask"]], dim=1)
                return hf(**{**hf_in, "decoder_attention_mask": mask},
                          past_key_values=hf_decoder_cache(*kv, B)).logits.numpy()
            if prompt is not None:  # prompt vectors as they are; tokens scaled by sqrt(d_model) if scale_embedding
                src, smask = hf_in.pop("input_ids"), hf_in.pop("attention_mask")
                tokens = hf.model.encoder.embed_tokens.weight[src] * hf.model.encoder.embed_tokens.embed_scale
                embeds = torch.cat([prompt[None].expand(B, -1, -1), tokens], dim=1)
                mask = torch.cat([torch.ones(B, P, dtype=torch.long), smask], dim=1)
                return hf(inputs_embeds=embeds, attention_mask=mask, **hf_in).logits.numpy()
            return hf(**hf_in).logits.numpy()

    def peft_reference(self, peft_model, hf, x):
        with torch.no_grad():
            return peft_model(**self.hf_inputs(x)).logits.numpy()


# --- decoder-only ------------------------------------------------------------------------------------------

SEP = 1  # the decoder-only families' separator (bos) id


@dataclasses.dataclass
class PackedInputs:
    """Right-padded, ragged sources and targets (numpy, pads are id 0), and HF's view of them: per example
    `[source real tokens, SEP, target real tokens]` packed to the left, and each source's length."""
    batch: dict[str, np.ndarray]
    ids: torch.Tensor
    mask: torch.Tensor
    starts: list[int]

    def ours(self, left: bool = False) -> dict:
        batch = left_padded(self.batch) if left else self.batch
        return {k: jnp.asarray(v) for k, v in batch.items()}

    @property
    def valid(self) -> np.ndarray:
        return self.batch["target_mask"]


def left_padded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same examples with each source's real tokens moved to the right end."""
    ids, mask = left_pad(batch["source_ids"], batch["source_mask"])
    return dict(batch, source_ids=ids, source_mask=mask)


def hf_prefix_cache(k: torch.Tensor, v: torch.Tensor, rows: int) -> DynamicCache:
    """A prefix as HF takes it: a cache holding `[rows, N, P, K]` per layer (a fresh one per call)."""
    e = lambda x: x[None].expand(rows, -1, -1, -1).clone()
    return DynamicCache([(e(k[i]), e(v[i])) for i in range(k.shape[0])])


@dataclasses.dataclass(frozen=True, eq=False)
class DecoderOnly(Family):
    cache_keyword: str = "cache"  # the name HF's forward is given the prefix cache under

    def batch(self, seed: int) -> PackedInputs:
        B, S, T = self.sizes.B, self.sizes.S, self.sizes.T
        rng = np.random.default_rng(seed)
        smask = np.ones((B, S), np.int32)
        smask[1, 6:] = 0
        smask[2, 2:] = 0
        tmask = np.ones((B, T), np.int32)
        tmask[0, 3:] = 0
        tmask[2, 5:] = 0
        src = rng.integers(3, self.vocab, (B, S)).astype(np.int32) * smask
        tgt = rng.integers(3, self.vocab, (B, T)).astype(np.int32) * tmask
        batch = dict(source_ids=src, source_mask=smask, target_ids=tgt, target_mask=tmask)
        width = S + 1 + T
        ids, mask = torch.zeros(B, width, dtype=torch.long), torch.zeros(B, width, dtype=torch.long)
        starts = []
        for b in range(B):
            row = [*src[b][smask[b] == 1], SEP, *tgt[b][tmask[b] == 1]]
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
            starts.append(int(smask[b].sum()))
        return PackedInputs(batch, ids, mask, starts)

    def target_logits(self, hf_logits: torch.Tensor, starts: list[int], offset: int = 0) -> np.ndarray:
        """HF logits at our target slots: target t of example b is HF position `offset + starts[b] + t`."""
        T = self.sizes.T
        return np.stack([hf_logits[b, offset + s: offset + s + T].detach().numpy() for b, s in enumerate(starts)])

    def with_prefix_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.ones(mask.shape[0], self.sizes.P, dtype=torch.long), mask], 1)

    def reference(self, hf, x: PackedInputs, kv=None, prompt=None) -> np.ndarray:
        """HF's logits at our target slots: plain, given `kv` as its cache (real tokens at P..), or given `prompt`
        `[P, D]` in front of the packed rows' embeddings."""
        with torch.no_grad():
            if kv is not None:
                cache = {self.cache_keyword: hf_prefix_cache(*kv, self.sizes.B)}
                logits = hf(input_ids=x.ids, attention_mask=self.with_prefix_mask(x.mask), **cache).logits
                return self.target_logits(logits, x.starts)
            if prompt is not None:
                embeds = torch.cat([prompt[None].expand(self.sizes.B, -1, -1), hf.get_input_embeddings()(x.ids)], 1)
                logits = hf(inputs_embeds=embeds, attention_mask=self.with_prefix_mask(x.mask)).logits
                return self.target_logits(logits, x.starts, offset=self.sizes.P)
            return self.target_logits(hf(input_ids=x.ids, attention_mask=x.mask).logits, x.starts)


def random_gpt2(seed: int, **kw) -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 with every parameter random (layer-norm scales and biases included)."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(gpt2_config(**kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def gpt2_config(**kw) -> transformers.GPT2Config:
    base = dict(vocab_size=101, n_positions=64, n_embd=HIDDEN, n_layer=3, n_head=4, bos_token_id=SEP, eos_token_id=2,
                initializer_range=0.2)
    return transformers.GPT2Config(**{**base, **kw})


LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=0.5, high_freq_factor=2.0,
                   original_max_position_embeddings=16)  # with head_dim 16, every llama3 branch is taken
# name -> (HF class name prefix, config fields beyond the common ones)
LLAMA_VARIANTS = {
    "llama": ("Llama", dict(num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
                            rope_parameters=LLAMA3_ROPE)),
    "llama_tied": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                 rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    "mistral": ("Mistral", dict(num_key_value_heads=2, sliding_window=64)),
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True,
                            rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=16)),
}
LLAMA_EOS = 2


def llama_config(name: str, **kw):
    """The tiny config of Llama-family variant `name` (a key of LLAMA_VARIANTS), fields overridden by `kw`."""
    prefix, fields = LLAMA_VARIANTS[name]
    base = dict(vocab_size=101, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=SEP, eos_token_id=LLAMA_EOS, initializer_range=0.2,
                attn_implementation="eager")
    return getattr(transformers, f"{prefix}Config")(**{**base, **fields, **kw})


def random_llama(name: str, seed: int = 0, **kw):
    """A tiny HF model of variant `name` with every parameter random (norm scales and biases included)."""
    torch.manual_seed(seed)
    hf = getattr(transformers, f"{LLAMA_VARIANTS[name][0]}ForCausalLM")(llama_config(name, **kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


GEMMA_WINDOW = 6  # shorter than prefix + text (4 + up to 16): every check runs past the sliding window
# name -> (HF config class name prefix, config fields beyond the common ones). Gemma 1: multi-query attention,
# head_dim != hidden / heads; Gemma 2: grouped queries, query_pre_attn_scalar != head_dim, small soft-caps (capping
# changes the numbers), sliding/global layers; Gemma 3: q/k norms, a RoPE base per layer type, linear RoPE scaling
# on the global layers.
GEMMA_VARIANTS = {
    "gemma": ("Gemma", dict(num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh",
                            rope_parameters=dict(rope_type="default", rope_theta=500.0))),
    "gemma2": ("Gemma2", dict(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=GEMMA_WINDOW,
                              layer_types=["sliding_attention", "full_attention"])),
    "gemma3_text": ("Gemma3Text", dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                       final_logit_softcapping=4.0, sliding_window=GEMMA_WINDOW,
                                       layer_types=["sliding_attention", "full_attention"],
                                       rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1e6,
                                                                               factor=2.0),
                                                        "sliding_attention": dict(rope_type="default",
                                                                                  rope_theta=100.0)})),
}
GEMMA_EOS = 2


def gemma_config(name: str, **kw):
    """The tiny config of Gemma variant `name` (a key of GEMMA_VARIANTS), fields overridden by `kw`."""
    prefix, fields = GEMMA_VARIANTS[name]
    base = dict(vocab_size=101, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=SEP, eos_token_id=GEMMA_EOS, pad_token_id=0,
                initializer_range=0.2, attn_implementation="eager")
    return getattr(transformers, f"{prefix}Config")(**{**base, **fields, **kw})


def random_gemma(name: str, seed: int = 0, **kw):
    """A tiny HF Gemma of variant `name` with every parameter random (norm weights included)."""
    torch.manual_seed(seed)
    model_class = getattr(transformers, f"{GEMMA_VARIANTS[name][0].removesuffix('Text')}ForCausalLM")
    hf = model_class(gemma_config(name, **kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


PHI3_WINDOW = 6  # shorter than prefix + text (4 + up to 16): the window variant's checks run past it
PHI3_SHORT_FACTOR = [1.0, 1.5, 3.0]  # longrope's per-frequency factors for 6 rotary dims (3 frequencies)
# name -> config fields beyond the common ones. phi3: full rotary, default RoPE, untied head, a sliding window on
# every layer (Phi-3 mini 4k); phi3_partial: partial_rotary_factor 0.75 (6 of 8 dims rotated), longrope (its short
# factors and attention factor: original context 32 of 64), tied head (Phi-4 mini's shape of config).
PHI3_VARIANTS = {
    "phi3": dict(sliding_window=PHI3_WINDOW, rope_parameters=dict(rope_type="default", rope_theta=500.0)),
    "phi3_partial": dict(tie_word_embeddings=True, original_max_position_embeddings=32,
                         rope_parameters=dict(rope_type="longrope", rope_theta=500.0, partial_rotary_factor=0.75,
                                              short_factor=PHI3_SHORT_FACTOR, long_factor=[4.0, 8.0, 16.0])),
}
PHI3_EOS = 2


def phi3_config(name: str, **kw):
    """The tiny config of Phi-3 variant `name` (a key of PHI3_VARIANTS), fields overridden by `kw`."""
    base = dict(vocab_size=101, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=SEP, eos_token_id=PHI3_EOS,
                pad_token_id=0, initializer_range=0.2, attn_implementation="eager")
    return transformers.Phi3Config(**{**base, **PHI3_VARIANTS[name], **kw})


def random_phi3(name: str, seed: int = 0, **kw):
    """A tiny HF Phi-3 of variant `name` with every parameter random (norm weights included)."""
    torch.manual_seed(seed)
    hf = transformers.Phi3ForCausalLM(phi3_config(name, **kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


_ENC_DEC = (ENCODER, DECODER, CROSS)
_AFTER = "positions_after_prefix"

FAMILIES: tuple[Family, ...] = (
    T5(name="t5", hf_class="T5ForConditionalGeneration", encoder_decoder=True, placements=_ENC_DEC,
       stacked="(encoder|decoder)/layers/",
       sizes=Sizes(B=3, S=11, T=7, P=5), vocab=99, lowest_id=2,
       variants={"v10": _t5_v10, "v11": _t5_v11},
       expect={"v10": dict(tied_lm_head=True, scale_decoder_outputs=True),
               "v11": dict(tied_lm_head=False, scale_decoder_outputs=False)},
       logits=(case("v10"), case("v11")),
       past_key_values=(case("v10"),),
       peft=(case("v10", layers=4),),  # (a model of its own; the variant names the family's default)
       padding_side=(case("v10"),),
       incremental=(case("v10"),),
       embedding_only=(case("v10"),),
       missing_tensor=("v10", "decoder.final_layer_norm", "decoder.final_layer_norm.weight")),
    Bart(name="bart", hf_class="BartForConditionalGeneration", encoder_decoder=True, placements=_ENC_DEC,
         stacked="(encoder|decoder)/layers/",
         sizes=Sizes(B=3, S=11, T=7, P=5), vocab=99, lowest_id=3, padding_kv_seed=10,
         variants={  # scaled: scale_embedding, GELU, 3 decoder layers (odd, != the encoder's); plain:
             # no scaling (bart-base/large), ReLU, 8 decoder heads (head geometry differs per stack)
             "scaled": lambda: (random_bart(0, scale_embedding=True, decoder_layers=3), save_tiny),
             "plain": lambda: (random_bart(1, scale_embedding=False, activation_function="relu",
                                           decoder_attention_heads=8), save_tiny)},
         expect={"scaled": dict(scale_embedding=True, decoder_layers=3),
                 "plain": dict(scale_embedding=False, decoder_layers=2)},
         logits=(case("scaled", slow=True), case("plain")),
         # HF with a cache of length P puts decoder tokens at P..: ours with positions_after_prefix=True
         past_key_values=(case("scaled", config={_AFTER: True}),),
         peft=(case("scaled", layers=2, config={_AFTER: True}),
               case("scaled", layers=3, config={_AFTER: True}, slow=True)),
         padding_side=(case("scaled", config={_AFTER: False}), case("scaled", config={_AFTER: True})),
         incremental=(case("scaled", config={_AFTER: False}, slow=True), case("scaled", config={_AFTER: True})),
         embedding_only=(case("scaled"),),
         missing_tensor=("plain", "decoder.layernorm_embedding", "model.decoder.layernorm_embedding.weight")),
    DecoderOnly(name="gpt2", hf_class="GPT2LMHeadModel", encoder_decoder=False, placements=(DECODER,),
                stacked="transformer/h/",
                sizes=Sizes(B=3, S=9, T=6, P=4), vocab=101, cache_keyword="past_key_values", padding_kv_seed=9,
                variants={  # variant: unscaled scores, explicit MLP width, exact GELU, another epsilon, HF's
                    # upcast attention path
                    "base": lambda: (random_gpt2(0), save_tiny),
                    "variant": lambda: (random_gpt2(1, scale_attn_weights=False, n_inner=48,
                                                    activation_function="gelu", layer_norm_epsilon=1e-6,
                                                    reorder_and_upcast_attn=True, attn_implementation="eager"),
                                        save_tiny)},
                logits=tuple(case(v, left=left) for v in ("base", "variant") for left in (False, True)),
                past_key_values=(case("base"), case("base", left=True)),
                peft=(case("base", gradients=False),),  # llama's cases compare gradients (the same shell)
                padding_side=(case("base"),),
                incremental=(case("base"), case("base", infix=True)),
                embedding_only=(case("base"),),
                missing_tensor=("base", "h.1.attn.c_proj", r"transformer\.h\.1\.attn\.c_proj")),
    DecoderOnly(name="llama", hf_class="LlamaForCausalLM", encoder_decoder=False, placements=(DECODER,),
                sizes=Sizes(B=3, S=9, T=6, P=4), vocab=101, cache_keyword="cache", padding_kv_seed=9,
                variants={name: (lambda name=name: (random_llama(name), save_tiny)) for name in LLAMA_VARIANTS},
                logits=tuple(case(v, left=left) for left in (False, True) for v in sorted(LLAMA_VARIANTS)),
                past_key_values=tuple(case(v, left=True) for v in sorted(LLAMA_VARIANTS)),
                peft=(case("llama", projection=True), case("qwen3", projection=False),
                      case("qwen2", projection=True, slow=True), case("llama", projection=False, slow=True),
                      case("qwen3", projection=True, slow=True), case("qwen2", projection=False, slow=True),
                      case("mistral", projection=True, slow=True)),
                padding_side=(case("llama"),),
                incremental=(case("llama"), case("llama", infix=True)),
                embedding_only=(case("qwen2"),),
                missing_tensor=("llama", "layers.1.mlp.up_proj", r"model\.layers\.1\.mlp\.up_proj"),
                generate=(case("llama"), case("llama", beams=3)), random=random_llama, eos=LLAMA_EOS, eos_steer=2.5),
    DecoderOnly(name="gemma", hf_class="GemmaForCausalLM", encoder_decoder=False, placements=(DECODER,),
                sizes=Sizes(B=3, S=9, T=6, P=4), vocab=101, cache_keyword="cache", padding_kv_seed=9,
                variants={name: (lambda name=name: (random_gemma(name), save_tiny)) for name in GEMMA_VARIANTS},
                logits=tuple(case(v, left=left) for v in sorted(GEMMA_VARIANTS) for left in (False, True)),
                # in sliding layers too: the prefix slides out of the window as HF's cache makes it
                past_key_values=tuple(case(v, left=True) for v in sorted(GEMMA_VARIANTS)),
                # PEFT 0.21.2's prefix tuning: logits, loss and gradients (Gemma 1's MQA too, with -m slow)
                peft=(case("gemma2"), case("gemma3_text"), case("gemma", slow=True)),
                # padding side, incremental decoding and embedding-only are new to Gemma: -m slow, so the default
                # set runs what test_gemma ran (generation there decodes incrementally past the window)
                padding_side=(case("gemma2", slow=True),),
                incremental=(case("gemma2", slow=True), case("gemma2", infix=True, slow=True)),
                # HF scales token ids' embeddings by sqrt(hidden) and takes inputs_embeds as they are, as ours
                # takes prompt vectors
                embedding_only=(case("gemma3_text", slow=True),),
                missing_tensor=("gemma2", "layers.1.mlp.up_proj", r"model\.layers\.1\.mlp\.up_proj"),
                # decoding runs past the sliding window (GEMMA_WINDOW)
                generate=(case("gemma2"), case("gemma3_text"), case("gemma3_text", beams=3)), random=random_gemma,
                eos=GEMMA_EOS, eos_steer=2.0),
    DecoderOnly(name="phi3", hf_class="Phi3ForCausalLM", encoder_decoder=False, placements=(DECODER,),
                sizes=Sizes(B=3, S=9, T=6, P=4), vocab=101, cache_keyword="cache", padding_kv_seed=9,
                variants={name: (lambda name=name: (random_phi3(name), save_tiny)) for name in PHI3_VARIANTS},
                expect={"phi3": dict(rotary_dim=8, rope_type="default", sliding_window=PHI3_WINDOW),
                        "phi3_partial": dict(rotary_dim=6, rope_type="longrope", sliding_window=None,
                                             original_max_position_embeddings=32, tie_word_embeddings=True)},
                logits=tuple(case(v, left=left) for v in sorted(PHI3_VARIANTS) for left in (False, True)),
                # past the window too: the prefix slides out of view as HF's cache makes it
                past_key_values=tuple(case(v, left=True) for v in sorted(PHI3_VARIANTS)),
                peft=(case("phi3_partial"), case("phi3", projection=False, slow=True)),
                padding_side=(case("phi3"),),
                incremental=(case("phi3"), case("phi3_partial", infix=True, slow=True)),
                embedding_only=(case("phi3_partial", slow=True),),
                missing_tensor=("phi3", "layers.1.self_attn.qkv_proj", r"model\.layers\.1\.self_attn\.qkv_proj"),
                # the window's decoding runs by default in `incremental`
                generate=(case("phi3_partial"), case("phi3", beams=3, slow=True)), random=random_phi3, eos=PHI3_EOS),
)
FAMILY = {f.name: f for f in FAMILIES}


def cases(check: str) -> list:
    """`pytest.param(family, case)` for every family's cases of `check`, the slow ones marked slow."""
    return [pytest.param(f, c, id=f"{f.name}-{c.id}", marks=[pytest.mark.slow] if c.slow else [])
            for f in FAMILIES for c in getattr(f, check)]


def left_padded_generation_sources(rows: int, width: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random sources for decoder-only `generate` parity (HF's decoder-only generate wants left
    padding): row 1 has 3 pads, row 2 has 6."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, vocab, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return src * mask, mask


def until_eos(rows: np.ndarray, eos: int) -> list[list[int]]:
    """Each row cut after its first `eos` (kept), or whole."""
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows.tolist()]


def hf_generate_unpadded(hf, src: torch.Tensor, mask: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], new: int,
                         beams: int, eos: int) -> list[list[int]]:
    """HF's `generate` after a prefix given as its cache (`kv`: torch K, V `[L, N, P, K]`), one row at a time,
    unpadded: P placeholder ids stand for the cached slots, then the row's real source tokens and SEP. (HF's
    sliding-window mask counts cache slots, so left pads between prefix and source would count as distance there;
    ours counts real tokens, which is HF's unpadded result.) Each row is cut after its first `eos`, as `until_eos`."""
    P = kv[0].shape[2]
    out = []
    for b in range(src.shape[0]):
        ids = torch.cat([torch.zeros(P, dtype=torch.long), src[b][mask[b] == 1], torch.tensor([SEP])])[None]
        with torch.no_grad():
            tokens = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=hf_prefix_cache(*kv, beams),
                                 max_new_tokens=new, num_beams=beams, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0)
        out.append(tokens[0, ids.shape[1]:].tolist())
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]
