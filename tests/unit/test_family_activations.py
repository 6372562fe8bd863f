"""Activations per family (engine/modeldesc/activations.py, through engine/memory_acts.py
family_saved) against what autograd actually saves in a tiny transformers model of the family.

Measured: the distinct storages the forward hands to autograd (saved_tensors_hooks; parameters
and buffers left out), plus under activation checkpointing the tensors each checkpointed block
keeps as its inputs (the engine checkpoints non-reentrantly, engine/long/blocks.py, whose own hooks
hide the saves inside a block). The model runs in fp32 or in bf16 parameters (the formulas' c =
n = 4 or 2), with eager attention (dropout on, as the families train) or SDPA (attention dropout
0: on CPU, SDPA with dropout takes the math path, which materialises the scores like eager). T5's
and DeBERTa's attention compute their scores themselves (DeBERTa has no SDPA path; T5 hands SDPA
its relative-position bias, which requires grad, so CPU takes the math path): eager only.
CPU dropout keeps a mask of the activation's dtype and LayerNorm statistics in the input dtype,
hence `accelerator=False`.
"""

from __future__ import annotations

import functools

import pytest

from dsl.engine.memory_acts import family_saved
from dsl.engine.memory_shape import state_bytes
from dsl.engine.modeldesc import describe_config
from dsl.engine.modeldesc.shape import from_description

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 0.0001
"""Largest relative difference allowed between the formula and the measured bytes (0.01%). Every
case is exact but DeBERTa's, whose 0-dim scale tensors the formula counts in the compute dtype
where one of them is fp32 (at most 8 B of 440 KB: 0.001%)."""

B, S, S_DEC = 2, 32, 24

CONFIGS = {
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=100, max_position_embeddings=64),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=100, max_position_embeddings=66, type_vocab_size=1),
    "deberta": dict(model_type="deberta", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=100, relative_attention=True, pos_att_type="c2p|p2c",
                    max_relative_positions=16, max_position_embeddings=64),
    "deberta-v2": dict(model_type="deberta-v2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=100, relative_attention=True, pos_att_type=["p2c", "c2p"],
                       share_att_key=True, position_buckets=8, max_relative_positions=16, norm_rel_ebd="layer_norm",
                       position_biased_input=False, max_position_embeddings=64),
    "t5": dict(model_type="t5", d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2, num_decoder_layers=3,
               vocab_size=100),
    "t5-gated": dict(model_type="t5", d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2, num_decoder_layers=2,
                     vocab_size=100, feed_forward_proj="gated-gelu"),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=100, num_local_experts=4,
                    num_experts_per_tok=2),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=100),
    "falcon": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2,
                   new_decoder_architecture=True, vocab_size=100, ffn_hidden_size=96),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=100, pad_token_id=0),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, vocab_size=100),
}
EAGER_ONLY = {"deberta", "deberta-v2", "t5", "t5-gated", "gpt2", "gpt_neox", "falcon", "phi3"}
"""DeBERTa and T5: see the module docstring. Fused q/k/v projections (GPT-2, GPT-NeoX, Falcon,
Phi-3) under CPU SDPA: which storage the kernel's saved q/k/v keep (the fused output or copies)
depends on its layout handling, which the formulas do not model (GPU flash keeps the views)."""
DROPOUT_KEYS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")

CASES = [(name, dtype, attn, ckpt) for name in CONFIGS for dtype in ("float32", "bfloat16")
         for attn in ("eager", "sdpa") for ckpt in (False, True) if not (attn == "sdpa" and name in EAGER_ONLY)]


def _build(config: dict, attn: str):
    config = dict(config)
    model_type = config.pop("model_type")
    if attn == "sdpa":
        config.update({key: 0.0 for key in DROPOUT_KEYS})
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    if model_type == "t5":
        model = transformers.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation=attn)
    elif model_type in ("bert", "roberta", "deberta", "deberta-v2"):
        model = transformers.AutoModel.from_config(cfg, attn_implementation=attn)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _measure(model, dtype: str, checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    model.train().to(getattr(torch, dtype))
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen.setdefault(storage.data_ptr(), storage.nbytes())

    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            inner = getattr(module, "_gradient_checkpointing_func", None)
            if inner is not None:
                def recording(function, *args, _inner=inner, **kwargs):
                    for t in _tensors([args, kwargs, getattr(function, "keywords", {})]):
                        keep(t)
                    return _inner(function, *args, **kwargs)
                module._gradient_checkpointing_func = recording

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    ids = torch.randint(0, 100, (B, S), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if model.config.model_type == "t5":
            model(input_ids=ids, decoder_input_ids=ids[:, :S_DEC].clone())
        else:
            model(input_ids=ids)
    return sum(seen.values())


def _predicted(config: dict, dtype: str, attn: str, checkpointing: bool) -> int:
    config = dict(config)
    if attn == "sdpa":
        config.update({key: 0.0 for key in DROPOUT_KEYS})
    shape = from_description(describe_config(config, "test"), S)
    sb = state_bytes("fp32") if dtype == "float32" else state_bytes("bf16", low_precision_states=True)
    saved = family_saved(shape, micro_batch=B, seq_len=S, sb=sb, flash_attention=attn == "sdpa",
                         accelerator=False, target_len=S_DEC)
    return saved.total(checkpointing)


@pytest.mark.parametrize("name,dtype,attn,checkpointing", CASES,
                         ids=[f"{n}-{d}-{a}{'-ckpt' if c else ''}" for n, d, a, c in CASES])
def test_formula_matches_saved_bytes(name: str, dtype: str, attn: str, checkpointing: bool) -> None:
    measured = _measure(_build(CONFIGS[name], attn), dtype, checkpointing)
    predicted = _predicted(CONFIGS[name], dtype, attn, checkpointing)
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured, predicted / measured - 1)


def test_eager_attention_grows_with_the_square_of_the_sequence() -> None:
    """What a user notices: eager attention's s^2 scores, absent under flash/SDPA."""
    shape = from_description(describe_config(CONFIGS["llama"], "test"), 4096)
    sb = state_bytes("bf16", low_precision_states=True)
    eager = family_saved(shape, micro_batch=1, seq_len=4096, sb=sb, flash_attention=False).total()
    flash = family_saved(shape, micro_batch=1, seq_len=4096, sb=sb, flash_attention=True).total()
    # 2 layers x 4 heads x 4096^2 x (fp32 softmax 4 B + its bf16 cast 2 B)
    assert eager - flash >= 2 * 4 * 4096 * 4096 * 6


def test_t5_decoder_length_sizes_the_decoder_and_the_logits() -> None:
    """T5's encoder and decoder at their own lengths: a shorter target shrinks the decoder's
    activations and the logits, not the encoder's."""
    from dsl.engine.memory_acts import logits

    description = describe_config(CONFIGS["t5"], "test")
    sb = state_bytes("bf16", low_precision_states=True)
    same = from_description(description, 512)
    short = from_description(description, 512, decoder_seq_len=128)
    a = family_saved(same, micro_batch=1, seq_len=512, sb=sb, flash_attention=False)
    b = family_saved(short, micro_batch=1, seq_len=512, sb=sb, flash_attention=False)
    encoder = {what: sum(v for _, v in items) for what, _, items in a.blocks}["encoder blocks"]
    assert {what: sum(v for _, v in items) for what, _, items in b.blocks}["encoder blocks"] == encoder
    assert b.total() < a.total()
    assert logits(short, micro_batch=1, seq_len=512).device_bytes * 4 == logits(same, micro_batch=1,
                                                                                seq_len=512).device_bytes
