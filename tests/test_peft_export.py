"""PEFT export: our prefix -> a PEFT prefix-tuning adapter directory -> `PeftModel.from_pretrained` gives our
logits; PEFT's own adapter -> our prefix -> our export -> the same logits again."""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import max_abs_diff, random_kv, save_tiny
from safetensors.numpy import load_file
from tolerances import F32_ATOL
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, Phi3Config, \
    Phi3ForCausalLM, T5Config, T5ForConditionalGeneration

from prefix_jax.models import CROSS, DECODER, ENCODER, KV, Prefix, load_pretrained
from prefix_jax.peft_compat import PEFT_TENSOR, PeftExportError, export_peft, load_peft

B, S, T, P, VOCAB = 2, 6, 5, 3, 50


def _noisy(hf, scale=0.2):
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(scale * torch.randn_like(p))
    return hf.eval()


def _tiny(which: str):
    torch.manual_seed({"gpt2": 0, "bart": 1, "t5": 2, "phi3": 3}[which])
    if which == "phi3":  # grouped K/V heads (PEFT's token_dim is then heads x head_dim of the K/V), partial rotary
        return _noisy(Phi3ForCausalLM(Phi3Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters=dict(rope_type="default", rope_theta=100.0, partial_rotary_factor=0.5))))
    if which == "gpt2":
        return _noisy(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                                      bos_token_id=1, eos_token_id=2)))
    if which == "bart":  # 3 decoder layers: PEFT's seq2seq layout maps them one-to-one
        return _noisy(BartForConditionalGeneration(BartConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
            decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)))
    return _noisy(T5ForConditionalGeneration(T5Config(  # 4 decoder layers: layers i and i+2 share a PEFT block
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=4, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0)))


def _inputs(seq2seq: bool, decoder_start: int = 0):
    g = torch.Generator().manual_seed(9)
    src = torch.randint(3, VOCAB, (B, S), generator=g)
    tgt = torch.randint(3, VOCAB, (B, T), generator=g)
    if seq2seq:  # HF's decoder inputs are our targets shifted right
        dec = torch.cat([torch.full((B, 1), decoder_start), tgt[:, :-1]], 1)
        # No decoder_attention_mask: HF (and so PEFT) reads a length-T one as covering the first T of the P + T keys.
        hf = dict(input_ids=src, attention_mask=torch.ones_like(src), decoder_input_ids=dec)
        return hf, src, tgt
    ids = torch.cat([src, torch.full((B, 1), 1), tgt[:, :-1]], 1)  # [x; SEP; y]: our GPT-2 layout (SEP = BOS = 1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids)), src, tgt


def _peft_logits(hf, directory, hf_in):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(directory)).eval()
    with torch.no_grad():
        return peft_model(**hf_in).logits.numpy(), peft_model


def _hf_logits_with_cache(hf, kv, hf_in, seq2seq):
    """HF given our decoder prefix as its cache: what PEFT must reproduce from the exported adapter."""
    from hf_fixtures import hf_decoder_cache
    from transformers.cache_utils import DynamicCache

    k, v = (torch.tensor(np.asarray(x)) for x in kv)
    if seq2seq:
        cache = hf_decoder_cache(k, v, B)
        return hf(**hf_in, past_key_values=cache).logits.detach().numpy()
    e = lambda x: x[None].expand(B, -1, -1, -1).clone()
    cache = DynamicCache([(e(k[i]), e(v[i])) for i in range(k.shape[0])])
    mask = torch.ones(B, P + hf_in["input_ids"].shape[1], dtype=torch.long)
    return hf(input_ids=hf_in["input_ids"], attention_mask=mask, past_key_values=cache).logits.detach().numpy()


def _decoder_prefix(lm, seed, tie_halves=False):
    kv = random_kv(lm.config.prefix_geometry()[DECODER], seed, P)[0]
    if tie_halves:
        half = kv.key.shape[0] // 2
        kv = KV(jnp.concatenate([kv.key[:half]] * 2), jnp.concatenate([kv.value[:half]] * 2))
    return kv


@pytest.mark.parametrize("which", ["gpt2", "bart", "t5", "phi3"])
def test_exported_adapter_gives_our_logits_in_peft(which, tmp_path):
    hf = _tiny(which)
    seq2seq = which in ("bart", "t5")
    lm = load_pretrained(str(save_tiny(hf, tmp_path / which)),
                         **({"positions_after_prefix": True} if which == "bart" else {}))
    kv = _decoder_prefix(lm, 4, tie_halves=which == "t5")
    prefix = Prefix(kv={DECODER: kv})
    directory = export_peft(prefix, lm.config, tmp_path / "adapter", "local/tiny")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == P
    assert list(load_file(directory / "adapter_model.safetensors")) == [PEFT_TENSOR]

    hf_in, src, tgt = _inputs(seq2seq, getattr(lm.config, "decoder_start_token_id", 0))
    peft_logits, _ = _peft_logits(hf, directory, hf_in)
    with torch.no_grad():
        cache_logits = _hf_logits_with_cache(hf, kv, hf_in, seq2seq)
    # Ours == HF with the prefix as its cache is pinned by each architecture's parity tests; here PEFT == that.
    assert max_abs_diff(peft_logits, cache_logits) < F32_ATOL
    plain = hf(**hf_in).logits.detach().numpy()
    assert max_abs_diff(peft_logits, plain) > 1e-2  # the adapter acts

    # Our own logits with the same prefix equal PEFT's.
    ours = _ours(lm, prefix, src, tgt, seq2seq)
    assert max_abs_diff(ours, peft_logits[:, -T:]) < F32_ATOL

    # And the adapter reads back as the same prefix.
    back = load_peft(directory, lm.config).kv[DECODER]
    np.testing.assert_array_equal(np.asarray(back.key), np.asarray(kv.key))
    np.testing.assert_array_equal(np.asarray(back.value), np.asarray(kv.value))


def _ours(lm, prefix, src, tgt, seq2seq):
    params = {"params": lm.params}
    batch = dict(source_ids=jnp.asarray(src.numpy()), source_mask=jnp.ones(src.shape, jnp.int32),
                 target_ids=jnp.asarray(tgt.numpy()), target_mask=jnp.ones(tgt.shape, jnp.int32))
    return np.asarray(lm.model.apply(params, batch, prefix))


def test_peft_adapter_round_trips_through_our_export(tmp_path):
    """PEFT's own (MLP-reparameterized, saved) adapter -> our Prefix -> export_peft -> identical logits in PEFT."""
    from peft import PrefixTuningConfig, get_peft_model

    hf = _tiny("bart")
    lm = load_pretrained(str(save_tiny(hf, tmp_path / "bart")), positions_after_prefix=True)
    torch.manual_seed(5)
    theirs = get_peft_model(copy.deepcopy(hf), PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, num_layers=3, num_attention_heads=4, token_dim=16,
        prefix_projection=True,
        encoder_hidden_size=8)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    prefix = load_peft(tmp_path / "theirs", lm.config)
    export_peft(prefix, lm.config, tmp_path / "ours", "local/tiny")
    hf_in, _, _ = _inputs(True, lm.config.decoder_start_token_id)
    a, _ = _peft_logits(hf, tmp_path / "theirs", hf_in)
    b, _ = _peft_logits(hf, tmp_path / "ours", hf_in)
    assert max_abs_diff(a, b) < 1e-6
    np.testing.assert_array_equal(load_file(tmp_path / "theirs" / "adapter_model.safetensors")[PEFT_TENSOR][:, :
                                  load_file(tmp_path / "ours" / "adapter_model.safetensors")[PEFT_TENSOR].shape[1]],
                                  load_file(tmp_path / "ours" / "adapter_model.safetensors")[PEFT_TENSOR])


@pytest.mark.parametrize("case,match", [
    ("encoder", "PEFT prefix tuning has no 'encoder' placement"),
    ("cross", "PEFT prefix tuning has no 'cross' placement"),
    ("untied_even", "share one prefix"),
    ("paper_positions", "model.positions_after_prefix=False"),
])
def test_unrepresentable_prefixes_are_refused(case, match, tmp_path):
    hf = _tiny("t5" if case == "untied_even" else "bart")
    lm = load_pretrained(str(save_tiny(hf, tmp_path / "m")),
                         **({} if case in ("untied_even", "paper_positions") else {"positions_after_prefix": True}))
    geometry = lm.config.prefix_geometry()
    kv = {DECODER: random_kv(geometry[DECODER], 1, P)[0]}
    if case in ("encoder", "cross"):
        kv[ENCODER if case == "encoder" else CROSS] = random_kv(geometry[ENCODER if case == "encoder" else CROSS], 2,
                                                                 P)[0]
    with pytest.raises(PeftExportError, match=match) as err:
        export_peft(Prefix(kv=kv), lm.config, tmp_path / "adapter", "x")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "adapter").exists()


def test_infix_and_prompt_are_refused(tmp_path):
    hf = _tiny("gpt2")
    lm = load_pretrained(str(save_tiny(hf, tmp_path / "g")))
    kv = random_kv(lm.config.prefix_geometry()[DECODER], 1, P)[0]
    with pytest.raises(PeftExportError, match="infix"):
        export_peft(Prefix(kv={DECODER: kv}, infix=True), lm.config, tmp_path / "a", "x")
    with pytest.raises(PeftExportError, match="prompt tuning"):
        export_peft(Prefix(prompt_embeds=jnp.zeros((P, 16))), lm.config, tmp_path / "a", "x")
