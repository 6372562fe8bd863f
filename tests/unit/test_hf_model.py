"""Hugging Face causal LMs in the bundled trainer (engine/hf_model.py, engine/train.py):
`run.train.model: {hf: DIR}` builds what transformers builds from DIR/config.json (or loads its
safetensors weights) and trains it; without the extra dsl[hf] the rank exits 2 with the hint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.engine.train import load_run_spec, main
from tests.hf_tiny import FAMILIES, write_model

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
FAST = "{micro_batch: 2, optimizer: {lr: 0.01}, scheduler: {type: constant, warmup_steps: 0}}"


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _spec(tmp_path: Path, model: str, engine: str = "{micro_batch: 2}", steps: int = 4) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"run:\n  train:\n    model: {model}\n    steps: {steps}\n    log_every: 1\n"
                    f"engine: {engine}\noutput_dir: {tmp_path / 'out'}\n")
    return spec


def _plain(folder: Path, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_from_its_config_with_the_weights_transformers_builds(tmp_path: Path, family: str,
                                                                                  capsys) -> None:
    import torch

    from dsl.engine import hf_model

    folder = write_model(tmp_path / "m", family)
    spec = load_run_spec(_spec(tmp_path, "{hf: m, seq_len: 16}", engine="{zero_stage: 3, " + FAST[1:]))
    assert spec.train.model.hf == str(folder.resolve())  # relative to the spec file's folder
    built = hf_model.build(spec.train.model, seed=0)
    plain = _plain(folder)
    assert {n.removeprefix("lm."): p for n, p in built.named_parameters()}.keys() == dict(plain.named_parameters()).keys()
    for name, p in plain.named_parameters():
        assert torch.equal(built.get_parameter(f"lm.{name}"), p), name

    assert main([str(spec_path := tmp_path / "spec.yaml")]) == 0, spec_path
    captured = capsys.readouterr()
    assert f"{sum(p.numel() for p in plain.parameters()):,} params, zero 3" in captured.err
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert abs(rows[0]["loss"] - 4.852) < 0.1  # ln(128): a random init over 128 tokens
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_safetensors_weights_in_the_folder_are_loaded_instead_of_a_random_init(tmp_path: Path) -> None:
    import torch

    from dsl.engine import hf_model

    folder = write_model(tmp_path / "m", "llama")
    trained = _plain(folder, seed=7)
    trained.save_pretrained(str(folder), max_shard_size="20KB")  # sharded: an index and several files
    assert len(list(folder.glob("*.safetensors"))) > 1
    built = hf_model.build(load_run_spec(_spec(tmp_path, "{hf: m, seq_len: 16}")).train.model, seed=0)
    for name, p in trained.named_parameters():
        assert torch.equal(built.get_parameter(f"lm.{name}"), p), name
    assert built.training


def test_hf_config_names_the_file_itself(tmp_path: Path) -> None:
    write_model(tmp_path / "m", "gpt2")
    assert main([str(_spec(tmp_path, "{hf_config: m/config.json, seq_len: 16}", steps=2))]) == 0


def test_a_missing_config_is_located(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"spec.yaml:3:\d+ run.train.model.hf: no config.json in that folder"):
        load_run_spec(_spec(tmp_path, "{hf: empty}"))


def test_a_sequence_longer_than_the_model_allows_is_refused(tmp_path: Path) -> None:
    write_model(tmp_path / "m", "gpt2")
    assert main([str(_spec(tmp_path, "{hf: m, seq_len: 128}"))]) == 2


def test_without_the_extra_a_rank_exits_2_with_the_install_hint(tmp_path: Path) -> None:
    """`pip install dsl` without [hf]: simulated by hiding transformers from the import system."""
    write_model(tmp_path / "m", "llama")
    spec = _spec(tmp_path, "{hf: m}")
    code = ("import sys; sys.modules['transformers'] = None; from dsl.engine.train import main; "
            f"sys.exit(main([{str(spec)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{spec}:3:" in proc.stderr and "run.train.model.hf: training a Hugging Face model needs transformers" \
        in proc.stderr and "pip install 'dsl[hf]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_model_known_only_by_its_counts_is_still_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "{params: 1000000, largest_layer_params: 10000}")
    with pytest.raises(UserError, match=r"spec.yaml:3:\d+ run.train.model.params: a model known only by its "
                                        r"counts has no weights to train"):
        load_run_spec(spec)


def test_the_spec_dsl_launch_writes_for_the_ranks_reads_back_as_the_same_model(tmp_path: Path) -> None:
    """resolved.yaml is a dump of the spec: a Hugging Face model must not come back with the
    bundled Llama's default dimensions written next to it (which the ranks would refuse)."""
    from dsl.launcher.plan import resolved_spec_yaml
    from dsl.launcher.spec import load_spec

    folder = write_model(tmp_path / "m", "qwen3")
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: hf\nrun:\n  train:\n    model: {{hf: {folder}, seq_len: 16}}\n"
                    f"resources: {{backend: local, procs_per_node: 1}}\noutput_dir: {tmp_path / 'out'}\n")
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(resolved_spec_yaml(load_spec(spec), str(tmp_path / "out")))
    model = load_run_spec(resolved).train.model
    assert (model.form, model.hf, model.seq_len) == ("hf", str(folder), 16)
    assert "hidden_size" not in resolved.read_text()


@pytest.mark.parametrize("setting", ["tiled_mlp"])
def test_a_long_context_setting_an_hf_model_cannot_take_is_located(tmp_path: Path, setting: str, capsys) -> None:
    """GPT-2's MLP (c_fc, gelu, c_proj) is not the SwiGLU the tiled MLP computes: refused at the
    setting's place in the spec, not trained without it."""
    write_model(tmp_path / "m", "gpt2")
    spec = _spec(tmp_path, "{hf: m, seq_len: 16}", engine=f"{{micro_batch: 2, {setting}: {{enabled: true}}}}")
    assert main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:6:" in err and f"engine.{setting}: needs " in err and "Traceback" not in err


def test_a_sequence_parallel_degree_the_heads_cannot_take_is_refused_before_any_group_forms(tmp_path: Path) -> None:
    """engine/long/hf_ulysses.py checks on every rank first (2-rank runs: tests/integration/test_hf_parity.py)."""
    from dsl.engine import hf_model
    from dsl.engine.long import hf_ulysses
    from dsl.engine.train_config import ModelConfig

    model = hf_model.build(ModelConfig(hf=str(write_model(tmp_path / "m", "llama")), seq_len=16), seed=0)
    hf_ulysses.check(model, 2)  # 4 heads, 2 kv heads, 16 tokens: splits
    with pytest.raises(UserError, match=r"engine.sequence_parallel: sequence_parallel \(3\) must divide "
                                        r"num_attention_heads \(4\)"):
        hf_ulysses.check(model, 3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_tiled_loss_and_mlp_on_an_hf_model_give_the_same_losses_with_fewer_saved_bytes(tmp_path: Path,
                                                                                    family: str) -> None:
    import torch

    from dsl.engine import hf_model, initialize
    from dsl.engine.train_config import ModelConfig

    folder = write_model(tmp_path / family, family)
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, extra in (("plain", {}), ("tiled", {"tiled_loss": {"enabled": True, "chunk_tokens": 24}}),
                        *([("mlp", {"tiled_mlp": {"enabled": True, "chunk_tokens": 24}})] if family != "gpt2" else [])):
        engine = initialize(hf_model.build(ModelConfig(hf=str(folder), seq_len=16), seed=0),
                            {"zero_stage": 3, "grad_clip": None, **extra})
        engine.state_summary()  # saved-tensor accounting on
        losses = []
        for _ in range(4):
            loss = engine(tokens, (tokens * 7 + 3) % 128, positions=torch.arange(16))
            loss.backward()
            engine.step()
            engine.zero_grad()
            losses.append(loss.item())
        runs[name] = losses, engine.state_summary()["activations_bytes"]
    assert max(abs(a - b) for a, b in zip(runs["plain"][0], runs["tiled"][0])) < 2e-6
    logits_bytes = 4 * 16 * 128 * 4  # [4, 16, vocab 128] fp32, and its log-softmax as much again
    assert runs["plain"][1] - runs["tiled"][1] >= logits_bytes, runs
    if family != "gpt2":  # the tiled MLP (Llama's SwiGLU): its [4, 16, 64] intermediates are not kept
        assert max(abs(a - b) for a, b in zip(runs["plain"][0], runs["mlp"][0])) < 2e-6
        assert runs["plain"][1] - runs["mlp"][1] >= 2 * 3 * 4 * 16 * 64 * 4, runs


def test_a_checkpointed_hf_run_resumes_at_another_stage_with_the_uninterrupted_losses(tmp_path: Path) -> None:
    """Checkpoints hold the HF model's parameters under their engine names (engine/checkpoint.py):
    3 steps at ZeRO-3 plus 3 resumed at ZeRO-0 give the losses of 6 steps straight at ZeRO-0."""
    write_model(tmp_path / "m", "qwen3")

    def run(out: str, stage: int, steps: int) -> list[float]:
        spec = tmp_path / f"{out}-{stage}.yaml"
        spec.write_text(f"run:\n  train:\n    model: {{hf: m, seq_len: 16}}\n    steps: {steps}\n    log_every: 1\n"
                        f"    checkpoint_every: 3\nengine: {{zero_stage: {stage}, micro_batch: 2, optimizer: {{lr: 0.01}}}}\n"
                        f"output_dir: {tmp_path / out}\n")
        assert main([str(spec)]) == 0
        return [json.loads(line)["loss"] for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    straight = run("straight", 0, 6)
    run("resumed", 3, 3)
    resumed = run("resumed", 0, 6)
    assert len(resumed) == 6 and max(abs(a - b) for a, b in zip(resumed, straight)) < 1e-6, (resumed, straight)
