"""Model descriptions from Hugging Face config.json files (engine/modeldesc/): every published
config in tests/fixtures/hf_configs/ (sources in its SOURCES file) counts exactly what
transformers builds on the meta device, the description never imports torch, and a bad file is a
located error that says what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.engine.modeldesc import FAMILIES, describe_config, describe_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests/fixtures/hf_configs"
PUBLISHED = sorted(FIXTURES.glob("*.json"))

# Small configs for the branches the published ones do not take (biases on, MoE blocks left
# dense, Falcon's two architectures, DeBERTa v1, gated T5, ...): counted against transformers too.
VARIANTS = {
    "llama-biases": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100, attention_bias=True,
                         mlp_bias=True, head_dim=32, tie_word_embeddings=True),
    "qwen3-bias": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=100,
                       attention_bias=True, tie_word_embeddings=True),
    "qwen3_moe-dense-blocks": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96,
                                   moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=100, num_experts=6,
                                   num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3]),
    "qwen2_moe-defaults": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=16, vocab_size=100, moe_intermediate_size=16,
                               shared_expert_intermediate_size=48, num_experts=4),
    "mixtral-head_dim": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=24, vocab_size=100,
                             num_local_experts=3, num_experts_per_tok=1),
    "phi3-gqa": dict(model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True, pad_token_id=0),
    "gemma-bias": dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=100,
                       attention_bias=True),
    "mistral-defaults": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=16, vocab_size=100),  # kv heads: the default 8
    "gpt2-n_inner-untied": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_inner=80, vocab_size=100,
                                n_positions=32, tie_word_embeddings=False),
    "gpt_neox-no-bias-tied": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=100, attention_bias=False,
                                  tie_word_embeddings=True),
    "falcon-new-arch": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                            num_kv_heads=2, new_decoder_architecture=True, bias=True, vocab_size=100,
                            ffn_hidden_size=96, tie_word_embeddings=False),
    "falcon-sequential": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              multi_query=False, parallel_attn=False, bias=True, vocab_size=100),
    "bert-defaults": dict(model_type="bert", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, vocab_size=100, max_position_embeddings=40),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, vocab_size=100, max_position_embeddings=42, type_vocab_size=1),
    "deberta-v1-relative": dict(model_type="deberta", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=100, relative_attention=True,
                                pos_att_type="c2p|p2c", talking_head=True, max_relative_positions=16,
                                type_vocab_size=2, embedding_size=48),
    "deberta-v1-absolute": dict(model_type="deberta", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=100),
    "deberta-v2-unshared-conv": dict(model_type="deberta-v2", hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                                     relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=False,
                                     position_buckets=-1, max_relative_positions=-1, conv_kernel_size=3,
                                     norm_rel_ebd="layer_norm", position_biased_input=False),
    "t5-gated-asymmetric": dict(model_type="t5", d_model=64, d_kv=8, d_ff=96, num_heads=4, num_layers=2,
                                num_decoder_layers=3, vocab_size=100, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False),
}


def _transformers_count(config: dict, kind: str) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.CONFIG_MAPPING[config["model_type"]](**{k: v for k, v in config.items() if k != "model_type"})
    auto = {"encoder": transformers.AutoModel, "encoder-decoder": transformers.AutoModelForSeq2SeqLM,
            "decoder": transformers.AutoModelForCausalLM}[kind]
    with torch.device("meta"):
        model = auto.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def test_every_family_has_a_published_fixture():
    """The acceptance of issue 15: one real config per family (DeBERTa v1 waits, see SOURCES)."""
    found = {json.loads(p.read_text())["model_type"] for p in PUBLISHED}
    missing = set(FAMILIES) - found - {"deberta"}
    assert not missing, f"no published config.json for {sorted(missing)}"
    sources = (FIXTURES / "SOURCES").read_text()
    for path in PUBLISHED:
        assert path.name in sources, f"{path.name} has no line in SOURCES"


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_published_config_counts_what_transformers_builds(path: Path):
    config = json.loads(path.read_text())
    description = describe_file(path, "test")
    assert description.params == _transformers_count(config, description.kind)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_counts_what_transformers_builds(name: str):
    config = VARIANTS[name]
    description = describe_config(config, name)
    assert description.params == _transformers_count(config, description.kind)


def test_known_figures_of_published_models():
    """What the model cards say, as a reader would check them: Mixtral 46.7B with 2 of 8 experts
    per token (12.9B active), Qwen3-30B-A3B 30.5B with 3.3B active, T5 encoder + decoder."""
    mixtral = describe_file(FIXTURES / "mixtral-8x7b-v0.1.json", "test")
    assert round(mixtral.params / 1e9, 1) == 46.7 and round(mixtral.active_params / 1e9, 1) == 12.9
    assert (mixtral.experts, mixtral.experts_per_tok, mixtral.moe_layers) == (8, 2, 32)
    qwen = describe_file(FIXTURES / "qwen3-30b-a3b.json", "test")
    assert round(qwen.params / 1e9, 1) == 30.5 and int(qwen.active_params / 1e8) == 33  # 3.35B: the card truncates
    assert (qwen.head_dim, qwen.kv_heads) == (128, 4)  # head_dim is the config's, not 2048 / 32
    t5 = describe_file(FIXTURES / "t5-small.json", "test")
    assert (t5.kind, t5.encoder_layers, t5.decoder_layers, t5.layers) == ("encoder-decoder", 6, 6, 12)
    gemma = describe_file(FIXTURES / "gemma-2b.json", "test")
    assert gemma.tied and gemma.head_params == 0 and gemma.largest_layer_params == gemma.embedding_params


def test_describing_never_imports_torch_or_transformers():
    code = ("import sys, pathlib\nfrom dsl.engine.modeldesc import describe_file\n"
            f"for p in sorted(pathlib.Path({str(FIXTURES)!r}).glob('*.json')): describe_file(p, 'x')\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print('IMPORTED', bad) if bad else print('CLEAN')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.stdout.strip() == "CLEAN", proc.stdout + proc.stderr


def test_unknown_model_type_names_the_known_families():
    with pytest.raises(UserError) as err:
        describe_config({"model_type": "qwen3moe", "hidden_size": 8}, "spec.yaml:3:7 run.train.model.hf_config")
    text = str(err.value)
    assert text.startswith("spec.yaml:3:7 run.train.model.hf_config: model_type 'qwen3moe'")
    assert "did you mean 'qwen3_moe'" in text and "llama" in text and "t5" in text and "params: N" in text


def test_missing_file_bad_json_and_bad_value_are_located(tmp_path: Path):
    where = "job.yaml:4:9 run.train.model.hf"
    with pytest.raises(UserError, match=r"^job.yaml:4:9 run.train.model.hf: no config.json in that folder"):
        describe_file(tmp_path / "config.json", where)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    with pytest.raises(UserError, match=r"bad.json:3:21: not valid JSON"):
        describe_file(bad, where)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"model_type": "llama", "hidden_size": "64"}))
    with pytest.raises(UserError, match=r"wrong.json: hidden_size must be an integer, got '64'"):
        describe_file(wrong, where)
