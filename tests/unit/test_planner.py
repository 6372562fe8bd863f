"""The planner on recorded machines: the choices and their reasons, batch arithmetic, sequence
parallel constraints, what would fit, CPU ranks, and how `dsl launch` uses it."""

from __future__ import annotations

import pytest

from dsl.engine.config import EngineConfig, unsupported_reason
from dsl.engine.errors import UserError
from dsl.engine.memory import ModelShape
from dsl.launcher import planner, planspec
from dsl.launcher.spec import load_spec
from dsl.topology.probe import load_topology
from tests.conftest import ROOT

SEVEN_B = ROOT / "configs/plan-7b.yaml"


def _plan(fixture: str, spec=SEVEN_B, hosts: int = 1, ranks: int | None = None, runnable=None) -> planner.Plan:
    topo = load_topology(fixture)
    return planspec.plan_spec(load_spec(spec), topo, hosts=hosts, ranks_per_host=ranks or len(topo.accelerators) or 1,
                             runnable=runnable)


def test_three_machines_three_different_justified_choices():
    h100, gh200, l40s = _plan("h100-sxm-8x"), _plan("gh200-1x"), _plan("l40s-8x-pcie")
    labels = {p.choice.label() for p in (h100, gh200, l40s)}
    assert len(labels) == 3, labels
    # NVSwitch: sharding is nearly free and everything stays on the GPUs, no recomputation.
    assert h100.choice.offload == "none" and not h100.choice.activation_checkpointing
    assert h100.choice.zero_stage >= 1  # 16 B/param x 6.7B does not fit 80 GB replicated
    assert h100.choice.step.dominant == "compute"
    # One GH200: nothing to shard over; the optimizer goes to Grace over NVLink-C2C for ~3% of a step.
    assert gh200.choice.offload == "cpu"
    assert any("NVLink-C2C" in r for r in gh200.reasons)
    assert gh200.choice.step.offload_s < 0.1 * gh200.choice.step.total_s
    # PCIe without NVLink: offload would fit too, but it only costs time here; shard and recompute.
    assert l40s.choice.offload == "none" and l40s.choice.activation_checkpointing
    assert any(r.startswith("CPU offload fits too") for r in l40s.reasons)
    for p in (h100, gh200, l40s):
        assert p.choice.fits and p.reasons[0].startswith("fits:")
        assert any(r.startswith("ZeRO stage 0 does not fit") for r in p.reasons)


def test_gh200_prefers_offload_over_sharding_across_the_network():
    plan = _plan("gh200-1x", hosts=4, ranks=1)
    assert plan.choice.offload == "cpu"
    stage3 = [c for c in plan.candidates if c.fits and c.zero_stage == 3 and c.offload == "none"]
    assert all(c.step.total_s > plan.choice.step.total_s for c in stage3)


def test_train_batch_is_micro_times_accum_times_dp_for_every_candidate():
    plan = _plan("h100-sxm-8x")
    assert plan.target_batch == 64
    for c in plan.candidates:
        assert c.micro_batch * c.grad_accum * c.dp == 64, c.label()
        assert c.dp * c.sp == 8


def test_sequence_parallel_degree_rules():
    shape = ModelShape.of("llama3-8b")  # 32 heads, 8 kv heads, seq 8192
    assert planner.valid_sp(shape, 4, 8, 8) is None
    assert planner.valid_sp(shape, 16, 16, 16) is None  # kv heads (8) divide sp: replicated
    assert "must divide num_attention_heads (32)" in planner.valid_sp(shape, 3, 6, 6)
    assert planner.valid_sp(shape, 8, 4, 16) is None  # two whole hosts of 4: the network carries it
    six = ModelShape(layers=2, hidden=96, heads=12, kv_heads=12, ffn=256, vocab=100, seq_len=96, tied=True)
    assert "part of one host or whole hosts" in planner.valid_sp(six, 6, 4, 12)
    odd = ModelShape(layers=2, hidden=96, heads=12, kv_heads=12, ffn=256, vocab=100, seq_len=102, tied=True)
    assert "must divide seq_len (102)" in planner.valid_sp(odd, 4, 8, 8)
    kv = ModelShape(layers=2, hidden=96, heads=12, kv_heads=3, ffn=256, vocab=100, seq_len=96, tied=True)
    assert "must divide one another" in planner.valid_sp(kv, 2, 4, 4)
    # Every candidate the planner tried respects them.
    for c in _plan("h100-sxm-8x").candidates:
        assert planner.valid_sp(ModelShape.of("llama2-7b"), c.sp, 8, 8) is None


def test_nothing_fits_says_what_would(tmp_path):
    plan = _plan("workstation-4090", spec=ROOT / "configs/plan-70b-workstation.yaml")
    assert plan.choice is None
    text = "\n".join(plan.suggestions)
    assert "more devices and shorter sequences:" in text or "more devices:" in text
    # With CPU offload the device keeps only 16-bit parameters, so what lacks is host RAM.
    assert "more host RAM:" in text and "per host (have 67.6 GB)" in text
    assert "shorter sequences alone do not help" in text  # model states dominate a 70B model
    closest = min(plan.candidates, key=lambda c: c.device_bytes)
    assert not closest.fits and "host needs" in closest.why_not


def test_shorter_sequence_is_suggested_when_activations_are_the_problem(write):
    spec = write("long.yaml", """\
name: long
run: {train: {model: {preset: llama2-7b, seq_len: 65536}}}
resources: {topology: l40s-8x-pcie}
engine: {precision: bf16, train_batch: 8, zero_stage: 3, offload: {optimizer: none},
         sequence_parallel: 1, activation_checkpointing: false}
""")
    plan = _plan("l40s-8x-pcie", spec=spec)
    assert plan.choice is None
    assert any(s.startswith("shorter sequences: seq_len") for s in plan.suggestions)
    assert any("set them to auto" in s for s in plan.suggestions)


def test_cpu_only_host_plans_cpu_ranks_sharing_ram(write):
    spec = write("cpu.yaml", """\
name: cpu
run: {train: {model: {preset: tiny}}}
resources: {procs_per_node: 2, topology: cpu-only}
engine: {zero_stage: auto, activation_checkpointing: auto, train_batch: 16}
""")
    plan = _plan("cpu-only", spec=spec, ranks=2)
    hw = plan.hardware
    assert not hw.accelerator and hw.device_memory_bytes == hw.host_ram_bytes // 2
    assert {c.offload for c in plan.candidates} == {"none"}  # the device already is host RAM
    assert plan.choice.zero_stage == 0 and plan.choice.micro_batch == 8  # tiny: no reason to shard
    assert "CPU" in hw.peak_note and "gloo" in hw.group_link(2).kind


def test_fixed_fields_are_kept_and_unwritten_batch_split_is_free(write):
    spec = write("fixed.yaml", """\
name: fixed
run: {train: {model: {preset: llama2-7b}}}
resources: {topology: h100-sxm-8x}
engine: {precision: bf16, train_batch: 64, zero_stage: 3, offload: {optimizer: none}, sequence_parallel: 1,
         activation_checkpointing: true}
""")
    plan = _plan("h100-sxm-8x", spec=spec)
    assert {(c.zero_stage, c.offload, c.sp, c.activation_checkpointing) for c in plan.candidates} == {(3, "none", 1, True)}
    assert plan.choice.micro_batch == 8 and plan.choice.grad_accum == 1  # the largest micro-batch that fits
    assert plan.fixed["zero_stage"] == 3 and "micro_batch" not in plan.fixed


def test_written_micro_batch_is_respected(write):
    spec = write("micro.yaml", """\
name: micro
run: {train: {model: {preset: llama2-7b}}}
resources: {topology: h100-sxm-8x}
engine: {precision: bf16, train_batch: 64, micro_batch: 2, zero_stage: auto, offload: {optimizer: auto},
         activation_checkpointing: auto}
""")
    plan = _plan("h100-sxm-8x", spec=spec)
    assert {c.micro_batch for c in plan.candidates} == {2}
    assert all(c.grad_accum * c.dp == 32 for c in plan.candidates)


def test_runnable_restricts_what_launch_may_choose():
    plan = _plan("h100-sxm-8x", runnable=lambda e: None if e.zero_stage == 3 else "not built")
    assert plan.launch_choice.zero_stage == 3
    assert all(c.unsupported is None for c in plan.candidates if c.zero_stage == 3)
    assert plan.engine_config(EngineConfig(zero_stage="auto")).zero_stage == 3


def test_step_time_terms_add_up():
    c = _plan("l40s-8x-pcie").choice
    st = c.step
    assert st.total_s >= max(st.compute_s, st.communication_s - st.exposed_s)
    assert st.dominant in ("compute", "communication", "offload")
    assert "MFU" in st.detail


# dsl launch -------------------------------------------------------------------------------------


def test_launch_fills_auto_fields_with_the_planner(write, monkeypatch, tmp_path):
    from dsl.launcher.launch import Mode, prepare

    monkeypatch.chdir(tmp_path)
    spec = write("auto.yaml", """\
name: auto
run: {train: {model: {preset: tiny}, steps: 5}}
resources: {procs_per_node: 2, topology: cpu-only}
engine: {zero_stage: auto, offload: {optimizer: auto}, sequence_parallel: auto, activation_checkpointing: auto}
""")
    prepared = prepare(spec, Mode.DRY_RUN)
    engine = prepared.spec_file.spec.engine
    assert unsupported_reason(engine) is None
    assert "auto" not in (engine.zero_stage, engine.offload.optimizer, engine.sequence_parallel,
                          engine.activation_checkpointing)
    resolved = next(text for path, text in prepared.plan.files.items() if path.endswith("resolved.yaml"))
    # compile: auto and cpu_allocator: auto are not the planner's: each rank decides (engine/compile.py:
    # its own C++ compiler; engine/cpu_alloc.py: its host's libjemalloc)
    engine_text = (resolved.split("engine:")[1].split("output_dir")[0].replace("compile: auto", "")
                   .replace("cpu_allocator: auto", ""))
    assert f"zero_stage: {engine.zero_stage}" in resolved and "auto" not in engine_text
    assert prepared.memory.launch_choice is not None


def test_launch_refuses_what_does_not_fit_before_starting_anything(write, monkeypatch, tmp_path):
    from dsl.launcher.launch import Mode, prepare

    monkeypatch.chdir(tmp_path)
    spec = write("big.yaml", """\
name: big
run: {train: {model: {preset: llama2-7b}}}
resources: {topology: h100-sxm-8x}
engine: {precision: bf16, train_batch: 64, zero_stage: 0}
""")
    with pytest.raises(UserError) as info:
        prepare(spec, Mode.DRY_RUN)
    message = str(info.value)
    assert "big does not fit on 8 x H100 80GB HBM3" in message and "device needs" in message
    assert not (tmp_path / "runs").exists()


def test_remote_hosts_are_probed_for_auto_fields_and_an_unreachable_one_is_named(write):
    from dsl.launcher.launch import Mode, prepare

    write("hostfile", "worker-0 slots=2\n")
    spec = write("ssh.yaml", """\
name: remote
run: {train: {}}
resources: {backend: ssh, hostfile: hostfile}
engine: {zero_stage: auto}
""")
    with pytest.raises(UserError, match="cannot probe every host") as err:
        prepare(spec, Mode.DRY_RUN)
    assert "worker-0" in str(err.value)
    # Nothing auto: a dry run does not reach the hosts (no memory check).
    fixed = write("ssh-fixed.yaml", "name: remote\nrun: {train: {}}\nresources: {backend: ssh, hostfile: hostfile}\n")
    assert prepare(fixed, Mode.DRY_RUN).memory is None


def test_topology_of_a_spec_names_the_field_on_error(write):
    from dsl.launcher.launch import Mode, prepare

    spec = write("t.yaml", "name: t\nrun: {train: {}}\nresources: {topology: dgx-h200}\n")
    with pytest.raises(UserError, match=r"t.yaml:3:\d+ resources.topology: topology 'dgx-h200'"):
        prepare(spec, Mode.DRY_RUN)


def test_a_fixed_sequence_parallel_degree_implies_the_batch_of_its_data_parallel_ranks(write):
    """micro_batch 8 x grad_accum 1 with sp 2 on 2 ranks is one data-parallel rank: a batch of 8.
    The planner used to imply 16 (x world), which no candidate could meet: "nothing fits"."""
    spec = write("sp.yaml", """\
name: sp
run: {train: {model: {preset: bench}}}
resources: {procs_per_node: 2, topology: cpu-only}
engine: {zero_stage: 2, precision: fp32, micro_batch: 8, grad_accum: 1, sequence_parallel: 2}
""")
    plan = _plan("cpu-only", spec=spec, ranks=2)
    assert (plan.choice.sp, plan.choice.micro_batch, plan.choice.grad_accum) == (2, 8, 1)
    assert any("8 sequences per step (micro_batch 8 x grad_accum 1 x 1 data-parallel ranks)" in n for n in plan.notes)


def test_the_plan_names_the_phase_of_the_peak_and_what_is_not_live_there(write):
    """With checkpointing the recomputed layer and the logits are never live together: the plan
    reports the phase peak (engine/memory_peak.py), below the sum of its terms, and says why."""
    import json

    from tests.conftest import run_dsl

    spec = write("ck.yaml", """\
name: ck
run: {train: {model: {preset: bench}}}
resources: {procs_per_node: 2, topology: cpu-only}
engine: {zero_stage: 2, precision: fp32, micro_batch: 8, grad_accum: 1, activation_checkpointing: true}
""")
    data = json.loads(run_dsl("plan", str(spec), "--json", check=True).stdout)
    choice = data["choice"]
    assert choice["peak"]["phase"] == "loss backward" and choice["device_bytes"] == choice["peak"]["bytes"]
    assert choice["device_bytes"] < choice["device_sum_bytes"]
    live = dict(choice["peak"]["live"])
    assert "logits" in live and "recomputation peak" not in live
    text = run_dsl("plan", str(spec), check=True).stdout
    assert "peak at loss backward:" in text and "recomputation peak" in text.split("peak at loss backward:")[1]


def test_sp_32_over_4_hosts_of_8_gpus_is_planned_and_costed_over_the_network(write):
    """Long-context runs (ALST) use SP groups of 32 over 4 nodes: accepted, and the group's
    all-to-alls are costed over the inter-host link, slower than inside one host."""
    spec = write("alst.yaml", """\
name: alst
run: {train: {model: {preset: llama3-8b, seq_len: 131072}}}
resources: {topology: h100-sxm-8x}
engine: {precision: bf16, zero_stage: 3, sequence_parallel: 32, activation_checkpointing: true, micro_batch: 1,
         grad_accum: 1, tiled_loss: {enabled: true}, tiled_mlp: {enabled: true}}
""")
    plan = _plan("h100-sxm-8x", spec=spec, hosts=4)
    assert plan.choice is not None and plan.choice.sp == 32
    one_host = _plan("h100-sxm-8x", spec=write("one.yaml", spec.read_text().replace(
        "sequence_parallel: 32", "sequence_parallel: 8")), hosts=4).choice
    assert one_host.sp == 8
    hw = plan.hardware
    assert hw.group_link(32).gb_s < hw.group_link(8).gb_s and hw.group_link(32).kind != hw.group_link(8).kind
    # A quarter of the all-to-all bytes per rank, over a link several times slower: more exposed time.
    assert plan.choice.step.exposed_s > one_host.step.exposed_s
