"""The files in cluster_configs/ are accepted by the tools that read them.

Launcher YAMLs go through the same preparation and schema validation ``ray up`` applies
(``prepare_config`` then ``validate_config``), the KubeRay manifest is parsed and its
memory sizing checked, and the Slurm script is syntax-checked, dry-run, and run for real
against stand-in ``srun``/``ray``/``scontrol`` commands to see it poll and give up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "cluster_configs"
LAUNCHER_FILES = ["local-static.yaml", "aws.yaml", "gcp.yaml"]
SBATCH = CONFIGS / "slurm-ray.sbatch"
GIB = 1024**3


def _load(name: str) -> dict:
    with open(CONFIGS / name) as f:
        return yaml.safe_load(f)


def _start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_passes_ray_up_validation(name):
    config = _load(name)
    validate_config(config)  # as written
    validate_config(prepare_config(config))  # as `ray up` sees it, defaults filled in


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_yaml_sizes_the_object_store_and_binds_the_dashboard_locally(name):
    config = _load(name)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for command in _start_commands(config):
        if command.strip() == "ray stop":
            continue
        store = re.search(r"--object-store-memory=(\d+)", command)
        assert store, f"{name}: no --object-store-memory in {command!r}"
        assert int(store.group(1)) >= 16 * 10**9
    # /dev/shm is either resized or checked before Ray starts.
    init = " ".join(
        [*config.get("initialization_commands", [])]
        + [
            c
            for t in config.get("available_node_types", {}).values()
            for c in t.get("initialization_commands", [])
        ]
    )
    assert "/dev/shm" in init
    assert any("raycache" in c for c in config["setup_commands"])


def test_launcher_shm_holds_the_object_store():
    # Each node type's /dev/shm (resized to NG, or required >= N bytes) exceeds its store.
    for name in ["aws.yaml", "gcp.yaml"]:
        config = _load(name)
        head_shm = _shm_bytes(config["initialization_commands"])
        head_store = _store_bytes(config["head_start_ray_commands"])
        assert head_shm > head_store, name
        worker = config["available_node_types"]["gpu_worker"]
        assert _shm_bytes(worker["initialization_commands"]) > _store_bytes(
            config["worker_start_ray_commands"]
        ), name
    local = _load("local-static.yaml")
    required = int(re.search(r"-lt (\d+)", local["initialization_commands"][0]).group(1))
    assert required > _store_bytes(local["worker_start_ray_commands"])


def _shm_bytes(commands: list[str]) -> int:
    size = re.search(r"remount,size=(\d+)G /dev/shm", " ".join(commands))
    assert size, commands
    return int(size.group(1)) * 10**9


def _store_bytes(commands: list[str]) -> int:
    return int(re.search(r"--object-store-memory=(\d+)", " ".join(commands)).group(1))


# ------------------------------------------------------------------ KubeRay
_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}


def _quantity(value: str | int) -> int:
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return int(match.group(1)) * _QUANTITY.get(match.group(2), 1)


def _pod_groups(manifest: dict) -> list[tuple[str, dict]]:
    spec = manifest["spec"]
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return groups


def test_kuberay_manifest_mounts_memory_backed_shm_sized_for_the_store():
    manifest = _load("kuberay-raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    assert manifest["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = _pod_groups(manifest)
    assert len(groups) >= 2
    for name, group in groups:
        params = group["rayStartParams"]
        # KubeRay passes rayStartParams as strings.
        assert all(isinstance(v, str) for v in params.values()), name
        store = int(params["object-store-memory"])
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        (shm_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        empty_dir = volumes[shm_mount["name"]]["emptyDir"]
        assert empty_dir["medium"] == "Memory", name
        shm = _quantity(empty_dir["sizeLimit"])
        assert shm >= store + 4 * GIB, f"{name}: /dev/shm {shm} does not hold the store {store}"
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), f"{name}: {kind}"
        # A memory-backed volume counts against the container's memory limit.
        assert _quantity(resources["limits"]["memory"]) >= shm + 16 * GIB, name
        assert "raycache" in container["image"], name


def test_kuberay_image_installs_raycache():
    dockerfile = (CONFIGS / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0", dockerfile, re.M)
    assert re.search(r"^RUN pip install .*/tmp/raycache", dockerfile, re.M)
    manifest = _load("kuberay-raycluster.yaml")
    assert manifest["spec"]["rayVersion"] == "2.60.0"


# ------------------------------------------------------------------ Slurm
def _bash(
    args: list[str], env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_sbatch_is_valid_bash():
    proc = _bash(["-n", str(SBATCH)])
    assert proc.returncode == 0, proc.stderr


def test_sbatch_dry_run_prints_the_commands_and_runs_none():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["RAYCACHE_DRY_NODES"] = "n0 n1 n2"
    env["PATH"] = "/nonexistent"  # nothing it could run is found: a dry run runs nothing
    bash = shutil.which("bash")
    proc = subprocess.run(
        [bash, str(SBATCH), "--dry-run", "train.py", "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    commands = [line for line in out if line.startswith("+ ")]
    assert "ray start --head --port=6379" in commands[0]
    assert "--object-store-memory=64000000000" in commands[0]
    assert "--dashboard-host=127.0.0.1" in commands[0]
    assert commands[1] == "+ ray status --address=n0:6379"
    workers = [c for c in commands if "ray start --address=n0:6379" in c]
    assert [c.split(" -w ")[1].split()[0] for c in workers] == ["n1", "n2"]
    assert commands[-1].endswith("--rdzv_endpoint=n0:29500 train.py --epochs 2")
    assert "--nnodes=3" in commands[-1]
    assert any("poll every 2 s, for at most 180 s" in line for line in out)


def _stub_path(tmp_path: Path, ray_status_rc: int) -> dict:
    """A PATH whose srun, ray, scontrol and python record their calls to ``calls.log``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # `ray status` answers once the head's step runs (never, with ray_status_rc=1), and the
    # node count is reached once a `ray start` step runs per node, as on a real cluster.
    # Each stub logs after its check, so the log's order is the order things were seen.
    head_up = "false" if ray_status_rc else 'grep -q -- "--head.*--block" "$LOG"'
    stubs = {
        "scontrol": 'echo "$*" >> "$LOG"; printf "n0\\nn1\\n"',
        # A `ray start --block` step runs until it is killed, and logs its end.
        "srun": (
            'if [[ "$*" == *--block* ]]; then trap \'echo "stopped $$" >> "$LOG"; exit 0\' TERM\n'
            '  echo "srun $$ $*" >> "$LOG"; while true; do sleep 0.1; done; fi\n'
            'echo "srun $$ $*" >> "$LOG"'
        ),
        "ray": f'if {head_up}; then echo "ray $* ok" >> "$LOG"; exit 0; fi\n'
        'echo "ray $* failed" >> "$LOG"; exit 1',
        "python": (
            'if [[ $(grep -c -- "ray start.*--block" "$LOG") -ge ${@: -1} ]]; then\n'
            '  echo "python ${@: -2} ok" >> "$LOG"; exit 0; fi\n'
            'echo "python ${@: -2} failed" >> "$LOG"; exit 1'
        ),
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}:/usr/bin:/bin",
        LOG=str(log),
        SLURM_JOB_NODELIST="n[0-1]",
        WAIT_TIMEOUT_S="3",
    )
    return env


def _wait_for_line(log: Path, prefix: str, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [x for x in log.read_text().splitlines() if x.startswith(prefix)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_sbatch_gives_up_when_the_head_never_answers(tmp_path):
    env = _stub_path(tmp_path, ray_status_rc=1)
    start = time.monotonic()
    proc = _bash([str(SBATCH), "train.py"], env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert "gave up after 3s waiting until the Ray head at n0:6379 answers" in proc.stderr
    assert 2 <= elapsed < 20  # the deadline counts whole seconds
    log = tmp_path / "calls.log"
    polls = [x for x in log.read_text().splitlines() if x.startswith("ray status")]
    assert len(polls) >= 2  # it polled, more than once
    assert not any("ray start --address" in x for x in log.read_text().splitlines())
    # The head's step was stopped by PID when the script exited.
    (head,) = [x for x in log.read_text().splitlines() if "ray start --head" in x]
    pid = head.split()[1]
    assert _wait_for_line(log, f"stopped {pid}", 1, timeout=5)


def test_sbatch_starts_workers_once_the_head_answers_and_runs_training(tmp_path):
    env = _stub_path(tmp_path, ray_status_rc=0)
    proc = _bash([str(SBATCH), "train.py", "--epochs", "1"], env=env)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "calls.log"
    lines = log.read_text().splitlines()
    order = [
        next(i for i, x in enumerate(lines) if "ray start --head" in x),
        lines.index("ray status --address=n0:6379 ok"),
        next(i for i, x in enumerate(lines) if "-w n1 ray start --address=n0:6379" in x),
        lines.index("python n0:6379 2 ok"),
        next(i for i, x in enumerate(lines) if "torch.distributed.run" in x),
    ]
    assert order == sorted(order)
    assert "--nnodes=2" in lines[order[-1]] and lines[order[-1]].endswith("train.py --epochs 1")
    # Both `ray start --block` steps were stopped when the script ended.
    assert len(_wait_for_line(log, "stopped ", 2, timeout=5)) == 2


def test_job_submit_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    path = REPO / "examples" / "ray_job_submit" / "runtime_env.yaml"
    with open(path) as f:
        env = RuntimeEnv(**yaml.safe_load(f), working_dir=str(REPO))
    assert ".git" in env["excludes"]


def test_documented_job_submission_uses_the_runtime_env_and_joins_the_cluster():
    # The `ray job submit` command of the guide and of this folder's README: the runtime
    # env file it names exists, and the example joins the job's cluster (--address auto)
    # instead of starting a Ray of its own inside the job.
    for doc in (REPO / "docs" / "cluster.md", CONFIGS / "README.md"):
        text = doc.read_text()
        commands = re.findall(r"\$ ray job submit .*?(?=\n```)", text, re.S)
        assert commands, doc
        for command in commands:
            env = re.search(r"--runtime-env (\S+)", command).group(1)
            assert (REPO / env).is_file(), (doc, env)
            assert "--working-dir ." in command
            assert "examples/ray_train.py --address auto" in command, (doc, command)
