"""`dsl sbatch` for specs equivalent to public multi-node batch scripts (issue 18).

tests/fixtures/batch_scripts/ holds public Slurm scripts verbatim (SOURCES says from where) and,
next to each, the dsl spec that says the same (`<name>.yaml`, its comment maps line to line).
For every fixture, the script `dsl sbatch` writes carries each feature the public script uses:
the same setup lines, srun options, #SBATCH options, prepended variables, container flags,
the script's own arguments ("$@"), the node count from the allocation; and neither --requeue nor
--signal unless the public script asks. Two of them are submitted to the test Slurm as the
public ones are, `sbatch --nodes=1` and `--nodes=2` of one rendered script: they train on 1 and 2
nodes and every rank sees what the setup lines export.

(`--gres=gpu:4` with 8 ranks per node refused, located: tests/unit/test_slurm_options.py.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_dsl
from tests.integration.multihost import wait_until
from tests.integration.test_slurm_backend import _state

pytestmark = pytest.mark.integration
FIXTURES = ROOT / "tests/fixtures/batch_scripts"
SPECS = sorted(FIXTURES.glob("*.yaml"))


def _render(spec: Path, folder: Path) -> str:
    """`dsl sbatch SPEC -o job.sh` run in `folder` (the submit directory, as for the originals)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = run_dsl("sbatch", str(spec), "-o", str(folder / "job.sh"), cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return (folder / "job.sh").read_text()


def _public(spec: Path) -> str:
    (script,) = [p for p in FIXTURES.glob(spec.stem + ".*") if p.suffix in (".slurm", ".sh")]
    return script.read_text()


ARGS = ["a b", "$(id)", "--steps", "3"]  # given to the rendered script: sbatch job.sh ARGS...
NNODES = "7"  # what the allocation says, for the probes below


class Rendered:
    """The parts of a `dsl sbatch` script, as bash reads them: #SBATCH options, the text before
    srun (run in the batch script), srun's argv, the node's setup script and the program argv it
    ends in (each rank's `python -m dsl.launcher.host.guard ... elastic ... SCRIPT ARGS`)."""

    def __init__(self, text: str):
        self.text = text
        self.sbatch = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
        start = text.index("\nsrun ") + 1
        self.head = text[:start]
        # bash runs the script from srun on, srun being a function that prints its argv.
        self.srun = self._argv('srun() { printf "%s\\0" "$@"; exit 0; }\n' + text[start:], *ARGS)
        assert self.srun[-1 - len(ARGS):] == ["dsl-node", *ARGS]  # the script's own arguments: "$@"
        node = self.srun[self.srun.index("-c") + 1]
        # srun's command on a node; its `exec bash -c SETUP dsl-setup PROGRAM...` printed, not run.
        exec_argv = self._argv('exec() { printf "%s\\0" "$@"; exit 0; }\ncd() { :; }\n' + node, *ARGS)
        if exec_argv[:2] == ["bash", "-c"]:  # run.setup: bash runs it, then execs the program
            assert exec_argv[3] == "dsl-setup", exec_argv[:4]
            self.node_setup, self.program = exec_argv[2], exec_argv[4:]
        else:
            self.node_setup, self.program = "", exec_argv

    @staticmethod
    def _argv(script: str, *args: str) -> list[str]:
        proc = subprocess.run(["bash", "-c", script, "job.sh", *args], capture_output=True,
                              env={**os.environ, "NNODES": NNODES, "SLURM_NODEID": "0"})
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode().split("\0")[:-1]

    def has_setup(self, line: str) -> bool:
        """`line` runs in the batch script and again on every node, before the ranks."""
        block = "{ " + line + "\n}"
        return block in self.head and block in self.node_setup


# Each public script's features and where the rendered script must carry them: (text of the
# public script, part of the rendered one, what that part holds). The first is checked against the
# public script, so each entry is the script's own feature, not ours.
FEATURES = {
    "accelerate_submit_multinode": [
        ("#SBATCH --nodes=4", "sbatch", "--nodes=4"),
        ("#SBATCH --gres=gpu:4", "sbatch", "--gres=gpu:4"),
        ("#SBATCH --cpus-per-task=160", "sbatch", "--cpus-per-task=160"),
        ("#SBATCH --time=01:59:00", "sbatch", "--time=119"),
        ("source activateEnvironment.sh", "setup", "source activateEnvironment.sh"),
        ('export ACCELERATE_DIR="${ACCELERATE_DIR:-/accelerate}"', "setup",
         'export ACCELERATE_DIR="${ACCELERATE_DIR:-/accelerate}"'),
        ("export GPUS_PER_NODE=4", "head", "export GPUS_PER_NODE=4"),
        ("--main_process_port 29500", "head", "MASTER_PORT=29500"),
        ("--mixed_precision fp16", "program", "--mixed_precision fp16"),
    ],
    "alignment_handbook_launch": [
        ("#SBATCH --exclusive", "sbatch", "--exclusive"),
        ("#SBATCH --gres=gpu:8", "sbatch", "--gres=gpu:8"),
        ("#SBATCH --partition=hopper-prod", "sbatch", "--partition=hopper-prod"),
        ("#SBATCH --requeue", "sbatch", "--requeue"),
        ("#SBATCH --time=3-00:00:00", "sbatch", "--time=4320"),
        ("module load cuda/12.9", "setup", "module load cuda/12.9"),
        ("source ~/.bashrc", "setup", "source ~/.bashrc"),
        ("source handbook/bin/activate", "setup", "source handbook/bin/activate"),
        ("--wait=60", "srun", "--wait=60"),
        ("export NCCL_ASYNC_ERROR_HANDLING=1", "head", "export NCCL_ASYNC_ERROR_HANDLING=1"),
        ("MASTER_PORT=6000", "head", "MASTER_PORT=6000"),
    ],
    "bigscience_tr11_176B_ml": [
        ("#SBATCH --partition=gpu_p5", "sbatch", "--partition=gpu_p5"),
        ("#SBATCH --constraint=a100", "sbatch", "--constraint=a100"),
        ("#SBATCH --reservation=hug", "sbatch", "--reservation=hug"),
        ("#SBATCH --qos=qos_gpu-gc", "sbatch", "--qos=qos_gpu-gc"),
        ("#SBATCH --nodes=24", "sbatch", "--nodes=24"),
        ("#SBATCH --cpus-per-task=64", "sbatch", "--cpus-per-task=64"),
        ("#SBATCH --hint=nomultithread", "sbatch", "--hint=nomultithread"),
        ("#SBATCH --gres=gpu:8", "sbatch", "--gres=gpu:8"),
        ("#SBATCH --time 100:00:00", "sbatch", "--time=6000"),
        ("#SBATCH --account=six@a100", "sbatch", "--account=six@a100"),
        ("source $six_ALL_CCFRWORK/code/tr11-176B-ml/bigscience/train/tr11-176B-ml/start-tr11-176B-ml", "setup",
         "source $six_ALL_CCFRWORK/code/tr11-176B-ml/bigscience/train/tr11-176B-ml/start-tr11-176B-ml"),
        ("export TRANSFORMERS_CACHE=$six_ALL_CCFRWORK/models", "setup",
         "export TRANSFORMERS_CACHE=$six_ALL_CCFRWORK/models"),
        ("export HF_DATASETS_OFFLINE=1", "head", "export HF_DATASETS_OFFLINE=1"),
        ("--wait=60", "srun", "--wait=60"),
        ("--tensor-model-parallel-size $TP_SIZE", "program", "--tensor-model-parallel-size 4"),
    ],
    "ml_engineering_torchrun_launcher": [
        ("#SBATCH --nodes=2", "sbatch", "--nodes=2"),
        ("#SBATCH --cpus-per-task=96", "sbatch", "--cpus-per-task=96"),
        ("#SBATCH --gres=gpu:8", "sbatch", "--gres=gpu:8"),
        ("#SBATCH --time=0:10:00", "sbatch", "--time=10"),
        ("#SBATCH --exclusive", "sbatch", "--exclusive"),
        ("#SBATCH --partition=xyz-cluster", "sbatch", "--partition=xyz-cluster"),
        ("--wait=60", "srun", "--wait=60"),
        ("--kill-on-bad-exit=1", "srun", "--kill-on-bad-exit=1"),
        ("--max_restarts 0", "program", "--max-restarts=0"),
        ("MASTER_PORT=6000", "head", "MASTER_PORT=6000"),
    ],
    "nanotron_mamba_run_multinode": [
        ("#SBATCH --wait-all-nodes=1", "sbatch", "--wait-all-nodes=1"),
        ("#SBATCH --qos=high", "sbatch", "--qos=high"),
        ("#SBATCH --gres=gpu:8", "sbatch", "--gres=gpu:8"),
        ("#SBATCH --time=00:02:00", "sbatch", "--time=2"),
        ("source /etc/profile.d/modules.sh", "setup", "source /etc/profile.d/modules.sh"),
        ("module load ${CUDA_MODULE}", "setup", "module load ${CUDA_MODULE}"),
        ("conda activate ${CONDA_ENV}", "setup", "conda activate ${CONDA_ENV}"),
        ("export PATH=${CONDA_PATH}/envs/${CONDA_ENV}/bin:$PATH", "setup",
         "export PATH=${CONDA_PATH}/envs/${CONDA_ENV}/bin:$PATH"),
        ("--wait=0", "srun", "--wait=0"),
        ("export WANDB_MODE=disabled", "head", "export WANDB_MODE=disabled"),
        (": ${MASTER_PORT:=12356}", "head", "MASTER_PORT=12356"),
    ],
    "nvidia_dlrm_slurm_multinode": [
        ("srun --mpi=none ${srun_flags}", "srun", "--mpi=none --mpi=pmix"),
        ('--container-image="${cont}"', "srun", "--container-image=dlrm_tf_adam"),
        ("--container-mounts=${mounts}", "srun", "--container-mounts=/data/dlrm:/data/dlrm"),
        ("--embedding_dim 512", "program", "--embedding_dim 512"),
    ],
    "open_r1_train": [
        ("#SBATCH --requeue", "sbatch", "--requeue"),
        ("#SBATCH --gres=gpu:8", "sbatch", "--gres=gpu:8"),
        ("#SBATCH --exclusive", "sbatch", "--exclusive"),
        ("module load cuda/12.4", "setup", "module load cuda/12.4"),
        ("source ~/.bashrc", "setup", "source ~/.bashrc"),
        ("source openr1/bin/activate", "setup", "source openr1/bin/activate"),
        ("find -L /fsx/h4/ -type f | xargs -d '\\n' -r -n512 -P64 weka fs tier fetch", "setup",
         "find -L /fsx/h4/ -type f | xargs -d '\\n' -r -n512 -P64 weka fs tier fetch"),
        ("--wait=60", "srun", "--wait=60"),
        ("MASTER_PORT=6000", "head", "MASTER_PORT=6000"),
    ],
    "openrlhf_train_nonrl_slurm": [
        ("#SBATCH --exclusive", "sbatch", "--exclusive"),
        ("#SBATCH --mem=0", "sbatch", "--mem=0"),
        ("#SBATCH --overcommit", "sbatch", "--overcommit"),
        ("#SBATCH -t 0-00:30:00", "sbatch", "--time=30"),
        ('--container-image="$IMAGE_NAME"', "srun", "--container-image=nvcr.io/nvidia/pytorch:26.03-py3"),
        ('--container-mounts="$PROJECT_PATH:/openrlhf,$HOME/.cache:/root/.cache"', "srun",
         "--container-mounts=/workspace/OpenRLHF:/openrlhf,/root/.cache:/root/.cache"),
        ("export MASTER_PORT=9901", "head", "MASTER_PORT=9901"),
    ],
    "torchtitan_multinode_trainer": [
        ("#SBATCH --nodes=4", "sbatch", "--nodes=4"),
        ("#SBATCH --gpus-per-task=8", "sbatch", "--gpus-per-node=8"),
        ("#SBATCH --cpus-per-task=96", "sbatch", "--cpus-per-task=96"),
        ("#SBATCH --partition=train", "sbatch", "--partition=train"),
        ("export LD_LIBRARY_PATH=/opt/amazon/efa/lib:$LD_LIBRARY_PATH\n"
         "export LD_LIBRARY_PATH=/usr/local/lib/:$LD_LIBRARY_PATH", "head",
         'export LD_LIBRARY_PATH=/usr/local/lib/:/opt/amazon/efa/lib"${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"'),
        ('export NCCL_SOCKET_IFNAME="eth0,en,eth,em,bond"', "head", "export NCCL_SOCKET_IFNAME=eth0,en,eth,em,bond"),
        ("dcgmi profile --pause", "setup", "dcgmi profile --pause"),
        ('--rdzv_endpoint "$head_node_ip:29500"', "head", "MASTER_PORT=29500"),
        ("--config ${CONFIG}", "program", "--config llama3_debugmodel"),
    ],
}


def test_every_fixture_has_its_source_and_a_spec():
    listed = {line.split()[0] for line in (FIXTURES / "SOURCES").read_text().splitlines()
              if line.endswith(tuple("0123456789abcdef")) and len(line.split()) == 4}
    scripts = {p.name for p in FIXTURES.iterdir() if p.suffix in (".slurm", ".sh")}
    assert listed == scripts and len(scripts) >= 6
    assert {p.stem for p in SPECS} == {Path(s).stem for s in scripts} == set(FEATURES)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_rendered_script_carries_the_public_scripts_features(spec, tmp_path):
    public, config = _public(spec), yaml.safe_load(spec.read_text())
    rendered = Rendered(_render(spec, tmp_path))
    for in_public, part, expected in FEATURES[spec.stem]:
        assert in_public in public, f"{spec.stem}: {in_public!r} is not in the public script"
        if part == "sbatch":
            assert expected in rendered.sbatch, (expected, rendered.sbatch)
        elif part == "setup":
            assert rendered.has_setup(expected), expected
        elif part == "head":
            assert re.search(rf"^{re.escape(expected)}$", rendered.head, re.M), expected
        elif part == "srun":
            options = rendered.srun[:rendered.srun.index("bash")]
            assert " ".join(options).find(expected) >= 0, (expected, options)
        else:
            assert " ".join(rendered.program).find(expected) >= 0, (expected, rendered.program)
    slurm = config["resources"]["slurm"]
    # What holds for every spec: its setup lines in the batch script and on every node; its srun
    # options after dsl's own (so they win); the node count and master from the allocation; the
    # script's own arguments at the end of every rank's command; --requeue only when the public
    # script asks and --signal never (none of them asks).
    for line in config["run"].get("setup", []):
        assert rendered.has_setup(line), line
    options = rendered.srun[:rendered.srun.index("bash")]
    assert options[-len(slurm.get("srun_args", [])) or len(options):] == slurm.get("srun_args", [])
    assert f"--nodes={NNODES}" in options and f"--ntasks={NNODES}" in options
    assert f"--nnodes={NNODES}" in rendered.program
    assert "NNODES=${DSL_NNODES:-$SLURM_JOB_NUM_NODES}" in rendered.head
    first_host = r'^MASTER_ADDR=\$\(scontrol show hostnames "\$SLURM_JOB_NODELIST" \| sed -n 1p\)'
    assert re.search(first_host, rendered.head, re.M)
    assert rendered.program[-len(ARGS) - len(config["run"].get("args", [])) - 1:] == [
        str(FIXTURES / config["run"]["script"]), *config["run"].get("args", []), *ARGS]
    assert ("--requeue" in rendered.sbatch) == ("#SBATCH --requeue" in public)
    assert not [o for o in rendered.sbatch if o.startswith("--signal")]
    if slurm.get("container_image"):
        assert f"--container-image={slurm['container_image']}" in options
        assert f"--container-mounts={','.join(slurm['container_mounts'])}" in options
    for name, value in config.get("env", {}).get("prepend", {}).items():
        # The prepend line run by bash: in front of the value the job has, ':' only when it had one.
        line = next(line for line in rendered.head.splitlines() if line.startswith(f"export {name}="))
        for before, after in (("/x:/y", f"{value}:/x:/y"), ("", value)):
            got = subprocess.run(["bash", "-c", f'{line}; printf %s "${name}"'], capture_output=True, text=True,
                                 env={**os.environ, name: before}).stdout
            assert got == after


# --- submitted to the test cluster -------------------------------------------------------------

# What the public scripts expect of their site that the test cluster lacks, made as small as it
# can be while behaving like the real thing for these lines:
# - `module`: Lmod puts its shell function in every non-interactive bash through BASH_ENV; this
#   one only knows `load`, exports LOADEDMODULES as Lmod does and logs where it ran.
# - HOME with the user's ~/.bashrc; a real venv (`python -m venv`) for `source X/bin/activate`;
#   accelerate's activateEnvironment.sh (the user's own file, in the submit directory).
LMOD_INIT = r"""module() {
    if [ "$1" != load ]; then echo "module: only 'load' in this stand-in" >&2; return 2; fi
    shift
    local name
    for name in "$@"; do
        case ":${LOADEDMODULES:-}:" in
            *":$name:"*) ;;
            *) export LOADEDMODULES="${LOADEDMODULES:+$LOADEDMODULES:}$name" ;;
        esac
        echo "$SLURM_JOB_ID $(hostname) $name" >> "$MODULE_LOG"
    done
}
"""


def _site(tmp_path: Path, folder: Path) -> dict[str, str]:
    site = tmp_path / "site"
    (site / "home").mkdir(parents=True)
    (site / "lmod-init.bash").write_text(LMOD_INIT)
    (site / "home/.bashrc").write_text('export BASHRC_SOURCED="yes, from $HOME"\n')
    (folder / "activateEnvironment.sh").write_text("export ACCELERATE_ENV=activated\n")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "handbook")], check=True)
    return {"BASH_ENV": str(site / "lmod-init.bash"), "MODULE_LOG": str(site / "module.log"),
            "HOME": str(site / "home")}


def _submit(cluster, folder: Path, env: dict[str, str], *argv: str) -> str:
    """`sbatch ARGV` from `folder` (the submit directory) with `env` added to this environment."""
    submitted = subprocess.run(["sbatch", "--parsable", *argv], cwd=folder, capture_output=True, text=True,
                               timeout=30, env={**os.environ, **cluster.env(), **env})
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def _trained(cluster, folder: Path, job_id: str) -> list[dict]:
    """Waits for the job to end COMPLETED; the TRAINED lines of its ranks."""
    done = wait_until(lambda: _state(cluster, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 150)
    outputs = sorted(p for p in folder.glob("runs/*/**/*") if p.is_file() and job_id in p.name)  # --output, --error
    text = "".join(p.read_text() for p in outputs)
    assert done and _state(cluster, job_id) == "COMPLETED", f"job {job_id}: {_state(cluster, job_id)}\n{text[-4000:]}"
    return [json.loads(m.group(1)) for m in re.finditer(r"^\d+: \[dsl:\d+:\d+\] TRAINED (.*)$", text, re.M)]


def _check_trained(ranks: list[dict], nodes: int, per_node: int) -> None:
    world = nodes * per_node
    assert sorted(r["rank"] for r in ranks) == list(range(world))
    assert {r["world_size"] for r in ranks} == {world} and {r["local_world_size"] for r in ranks} == {per_node}
    assert len({r["host"] for r in ranks}) == nodes
    assert all(r["last_loss"] < r["first_loss"] / 2 for r in ranks), [(r["first_loss"], r["last_loss"]) for r in ranks]
    assert len({tuple(r["weights"]) for r in ranks}) == 1  # DDP kept every rank's model the same


# sbatch options that adapt the public scripts' GPU-cluster requests to the test cluster (no
# partition hopper-prod, no GPUs), given on the command line as a user moving a script to another
# cluster would: they override the script's #SBATCH lines, the script stays as rendered.
TEST_CLUSTER = ["--partition=debug", "--gres=none"]


def test_alignment_handbook_script_trains_on_the_nodes_sbatch_gives_it(cluster, tmp_path):
    folder = tmp_path / "handbook"
    text = _render(FIXTURES / "alignment_handbook_launch.yaml", folder)
    assert "#SBATCH --partition=hopper-prod" in text and "#SBATCH --gres=gpu:8" in text
    env = {**_site(tmp_path, folder),
           "TRAIN_TINY_REPORT": "LOADEDMODULES,BASHRC_SOURCED,VIRTUAL_ENV,NCCL_ASYNC_ERROR_HANDLING"}
    args = ["--model", "zephyr-7b", "--args", "a b; $(id) 'q'"]  # the script's own, passed on by "$@"
    # One script, two jobs at once (1 + 2 of the cluster's 3 nodes; --exclusive keeps them apart).
    jobs = {nodes: _submit(cluster, folder, env, f"--nodes={nodes}", *TEST_CLUSTER, "job.sh", *args)
            for nodes in (1, 2)}
    for nodes, job_id in jobs.items():
        ranks = _trained(cluster, folder, job_id)
        _check_trained(ranks, nodes, 8)
        assert {tuple(r["args"]) for r in ranks} == {tuple(args)}
        assert {json.dumps(r["env"], sort_keys=True) for r in ranks} == {json.dumps({
            "LOADEDMODULES": "cuda/12.9", "BASHRC_SOURCED": f"yes, from {tmp_path}/site/home",
            "VIRTUAL_ENV": str(folder / "handbook"), "NCCL_ASYNC_ERROR_HANDLING": "1"}, sort_keys=True)}
        log = (tmp_path / "site/module.log").read_text().splitlines()
        loaded_on = {line.split()[1] for line in log if line.split()[0] == job_id}
        assert loaded_on == {r["host"] for r in ranks}  # `module load` ran on every node of the job


def test_accelerate_script_trains_on_the_nodes_sbatch_gives_it(cluster, tmp_path):
    folder = tmp_path / "accelerate"
    # The script asks 160 CPUs a task; the test cluster's nodes have 2: `sbatch --cpus-per-task=1`
    # lowers it for the job, and srun takes the job's value ($SLURM_CPUS_PER_TASK).
    spec = yaml.safe_load((FIXTURES / "accelerate_submit_multinode.yaml").read_text())
    assert spec["resources"]["slurm"]["cpus_per_task"] == 160
    spec["run"]["script"] = str(FIXTURES / spec["run"]["script"])
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(spec))
    text = _render(tmp_path / "accelerate.yaml", folder)
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gres=gpu:4" in text and "#SBATCH --cpus-per-task=160" in text
    env = {**_site(tmp_path, folder), "ACCELERATE_DIR": str(tmp_path / "acc dir"),
           "TRAIN_TINY_REPORT": "ACCELERATE_ENV,ACCELERATE_DIR,GPUS_PER_NODE"}
    for nodes in (1, 2):  # one after the other: the script's fixed port 29500 would collide on a shared node
        ranks = _trained(cluster, folder, _submit(cluster, folder, env, f"--nodes={nodes}", "--cpus-per-task=1",
                                                  *TEST_CLUSTER, "job.sh"))
        _check_trained(ranks, nodes, 4)
        assert {tuple(r["args"]) for r in ranks} == {("--mixed_precision", "fp16", "--output_dir",
                                                      "/accelerate/examples/output")}
        # activateEnvironment.sh's export, and ACCELERATE_DIR from where sbatch ran (the setup
        # line's default not taken)
        assert {json.dumps(r["env"], sort_keys=True) for r in ranks} == {json.dumps({
            "ACCELERATE_ENV": "activated", "ACCELERATE_DIR": str(tmp_path / "acc dir"), "GPUS_PER_NODE": "4"},
            sort_keys=True)}
