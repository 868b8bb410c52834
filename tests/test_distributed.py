"""FlexLoRA under real multi-process engines on CPU (gloo): DDP, FSDP2, HSDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each engine is one launch of tests/distributed/worker.py with the accelerate config a user would use
(accelerate_configs/cpu_*.yaml); DDP (two machines of one process) and HSDP (two machines of two processes, a 2 x 2
mesh) are launched on loopback the way launch/slurm_multinode.sbatch launches nodes. Every result is compared with
one process training the same scenarios on the same global batches (same worker, no launcher). Launches are
module-scoped fixtures: about 15 s of imports each, so each engine runs all its scenarios in one launch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexlora import distributed as fl_dist

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed" / "worker.py"
SHARDED_LOADING_WORKER = REPO / "tests" / "distributed" / "sharded_loading.py"
CONFIGS = REPO / "accelerate_configs"
TOLERANCE = 1e-5  # fp32; the engines differ only in reduction order
LAUNCH_TIMEOUT = 300

SCENARIOS = {
    "single": ["entropy", "sensitivity", "small"],
    "ddp": ["entropy", "sensitivity", "small"],
    "fsdp2": ["entropy", "sensitivity"],
    "hsdp": ["entropy", "sensitivity"],
    "zero2": ["entropy", "small"],
    "zero3": ["entropy"],
}
SHARDED = {"fsdp2", "hsdp", "zero3"}
WORLD = {"hsdp": 4}  # processes per engine; 2 for the others
SHARD_GROUP = 2  # processes one lambda all-gather spans: the world under FSDP2 / ZeRO-3, one replica's under HSDP


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _launch(commands: list[list[str]], out: Path, port: int | None = None, env: dict[str, str] | None = None) -> Path:
    """Run the commands (one per machine) and wait; raise with their logs if any fails. ``env`` adds variables.

    A later machine starts once the first listens on ``port``: with the c10d rendezvous on loopback, whichever
    agent binds the port first hosts the store, and machine 0's launcher refuses a port already taken.
    """
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    for index, command in enumerate(commands):
        if index and port is not None:
            while not _listening(port):
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        log = open(out / f"launch{index}.log", "w")
        logs.append(log)
        # Own session: on a timeout the launcher and the workers it spawned are killed together.
        procs.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env={**_env(), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        for log in logs:
            log.close()
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        tails = "\n".join(
            f"--- {out}/launch{i}.log ---\n" + (out / f"launch{i}.log").read_text()[-4000:] for i in failed
        )
        raise RuntimeError(f"launch failed (return codes {[p.returncode for p in procs]}):\n{tails}")
    return out


def _accelerate(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *args]


def _worker(engine: str, out: Path, *extra: str) -> list[str]:
    return [str(WORKER), "--engine", engine, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Lazily launched engine runs, each at most once per module."""
    base = tmp_path_factory.mktemp("distributed")
    done: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine in done:
            return done[engine]
        out = base / engine
        if engine == "single":
            # The reference; it also resumes the FSDP2 run's 2-process save with this one process.
            done[engine] = _launch([[sys.executable, *_worker("single", out, "--resume-from", str(get("fsdp2")))]], out)
        elif engine in ("ddp", "hsdp"):
            port = _free_port()
            machines = [
                _accelerate(
                    f"cpu_{engine}.yaml",
                    "--num_machines",
                    "2",
                    "--num_processes",
                    str(WORLD.get(engine, 2)),
                    "--machine_rank",
                    str(rank),
                    "--main_process_ip",
                    "127.0.0.1",
                    "--main_process_port",
                    str(port),
                    "--rdzv_backend",
                    "c10d",
                    *_worker(engine, out),
                )
                for rank in (0, 1)
            ]
            done[engine] = _launch(machines, out, port)
        else:
            command = _accelerate(f"cpu_{engine}.yaml", "--main_process_port", str(_free_port()), *_worker(engine, out))
            done[engine] = _launch([command], out)
        return done[engine]

    return get


def _records(run: Path, scenario: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(run.glob(f"{scenario}_rank*.json"))]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _without_scores(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in change.items() if k != "score"} for change in history]


def _assert_matches_one_process(engine: str, run: Path, reference: Path, scenario: str) -> list[dict]:
    """Every rank of ``run`` took the same decisions as every other and as one process, and ends with the same
    adapter; returns the ranks' records."""
    ranks = _records(run, scenario)
    (single,) = _records(reference, scenario)
    world = WORLD.get(engine, 2)
    assert [r["world"] for r in ranks] == [world] * world, f"{engine}/{scenario}: ran another number of processes"
    expected_type = {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "hsdp": "FSDP"}.get(engine, "DEEPSPEED")
    assert {r["distributed_type"] for r in ranks} == {expected_type}
    # Every rank took exactly the same decisions (scores included: they come from the same gathered lambda).
    assert all(r["masks"] == ranks[0]["masks"] and r["history"] == ranks[0]["history"] for r in ranks[1:])
    history = ranks[0]["history"]
    assert len({c["step"] for c in history}) >= 2 and {c["action"] for c in history} == {"prune", "expand"}
    # ... and the same as one process; the scores agree up to reduction order.
    assert ranks[0]["masks"] == single["masks"], f"{engine}/{scenario}"
    assert _without_scores(history) == _without_scores(single["history"]), f"{engine}/{scenario}"
    assert max(abs(a["score"] - b["score"]) for a, b in zip(history, single["history"])) < 1e-6
    adapters = [torch.load(r / f"{scenario}_adapter.pt") for r in (run, reference)]
    difference = _max_difference(*adapters)
    assert difference <= TOLERANCE, f"{engine}/{scenario}: final adapter differs by {difference:.3g}"
    return ranks


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
def test_two_processes_match_one_process(runs, engine):
    for scenario in SCENARIOS[engine]:
        _assert_matches_one_process(engine, runs(engine), runs("single"), scenario)


def test_hsdp_2x2_matches_one_process(runs):
    """4 processes on a 2 x 2 HSDP mesh (two machines of two processes: replicas across machines, shards within)
    train with allocation, save, export to PEFT and resume their own save exactly as one process does."""
    run, reference = runs("hsdp"), runs("single")
    for scenario in ["entropy", "sensitivity", "resume_self"]:
        ranks = _assert_matches_one_process("hsdp", run, reference, scenario)
        # Each process trained 1 of the 4 rows of a global batch: their mean loss is one process's loss.
        (single,) = _records(reference, scenario)
        mean_losses = torch.tensor([r["losses"] for r in ranks], dtype=torch.float64).mean(dim=0)
        difference = (mean_losses - torch.tensor(single["losses"], dtype=torch.float64)).abs().max().item()
        assert difference <= TOLERANCE, f"hsdp/{scenario}: per-step losses differ by {difference:.3g}"
        # The lambda gather's group (the shard group) lies within one machine.
        assert all(len(set(r["shard_group_nodes"])) == 1 for r in ranks), [r["shard_group_nodes"] for r in ranks]
    exports = [load_file(r / "entropy_step5_peft" / "adapter_model.safetensors") for r in (run, reference)]
    assert _max_difference(*exports) <= TOLERANCE
    configs = [json.loads((r / "entropy_step5_peft" / "adapter_config.json").read_text()) for r in (run, reference)]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "hsdp", "zero2", "zero3"])
def test_allocation_moves_only_lambda(runs, engine):
    """Per allocation step: one all-gather of one flat buffer of the local lambdas when lambda is sharded (none
    when replicated) over the shard group, never across HSDP replicas, plus the 16-byte decision check over every
    process, and nothing else. Each call is [op, bytes this process sends, processes in its group]."""
    world = WORLD.get(engine, 2)
    for scenario in SCENARIOS[engine]:
        for record in _records(runs(engine), scenario):
            n, capacity = record["num_modules"], record["capacity"]
            expected = []
            if engine in SHARDED:
                sent, _ = fl_dist.lambda_gather_payload(n, capacity, world=SHARD_GROUP)
                expected.append(["c10d._allgather_base_", sent * 4, SHARD_GROUP])  # float32
                assert sent == n * math.ceil(capacity / SHARD_GROUP)
            if scenario == "sensitivity" and engine in SHARDED:
                expected.append(["c10d.allreduce_", n * capacity * 8, SHARD_GROUP])  # per-slot partial sums, float64
            expected.append(["c10d.allreduce_", 16, world])  # decision digest: two int64
            assert len(record["comm"]) == 3, record["comm"]
            for step, comm in record["comm"].items():
                assert comm["calls"] == expected, f"{engine}/{scenario} step {step}: {comm['calls']}"
                assert comm["counted"] == len(expected)


def test_fsdp2_bf16_mixed_precision_trains_and_ranks_agree(runs):
    ranks = _records(runs("fsdp2"), "entropy_bf16")
    assert len(ranks) == 2 and ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["history"] == ranks[1]["history"]
    assert {c["action"] for c in ranks[0]["history"]} == {"prune", "expand"}
    assert all(math.isfinite(loss) for r in ranks for loss in r["losses"])


def test_fsdp2_save_resumes_with_one_process(runs):
    """A save written by 2 FSDP2 processes loads into 1 process with the same outputs (native and PEFT
    format) and continues training exactly as 1 process resuming its own save."""
    sharded, single = runs("fsdp2"), runs("single")
    expected = torch.load(sharded / "entropy_step5_logits.pt")
    for name in ("resumed_logits.pt", "peft_logits.pt"):
        difference = (torch.load(single / name) - expected).abs().max().item()
        assert difference <= TOLERANCE, f"{name}: {difference:.3g}"
    (own,) = _records(single, "resume_self")
    (resumed,) = _records(single, "resume_sharded")
    assert resumed["masks"] == own["masks"]
    assert _without_scores(resumed["history"]) == _without_scores(own["history"])
    assert any(c["step"] > 5 for c in resumed["history"]), "no allocation step after the resume"
    difference = _max_difference(
        torch.load(single / "resume_sharded_adapter.pt"), torch.load(single / "resume_self_adapter.pt")
    )
    assert difference <= TOLERANCE


@pytest.fixture(scope="module")
def sharded_loading_run(tmp_path_factory) -> Path:
    """One 2-process FSDP2 run of tests/distributed/sharded_loading.py loaded two ways, launched side by side: with
    sharded loading (only the main process reads the checkpoint) and without, on a checkpoint of random weights."""
    from tiny_models import build_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path_factory.mktemp("sharded_loading")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(base / "model")  # 290 MiB in fp32: its size shows in a process's memory
    tokenizer.save_pretrained(base / "model")
    out = base / "runs"
    worker = [str(SHARDED_LOADING_WORKER), "--model", str(base / "model"), "--out", str(out)]
    sharded = _accelerate(
        "cpu_fsdp2.yaml",
        "--main_process_port",
        str(_free_port()),
        "--fsdp_cpu_ram_efficient_loading",
        "true",
        *worker,
        "--name",
        "sharded",
    )
    plain = _accelerate("cpu_fsdp2.yaml", "--main_process_port", str(_free_port()), *worker, "--name", "plain")
    # glibc keeps freed heap memory mapped, which would count every parameter's broadcast buffer, freed after use, in
    # the resident set; served by mmap, large buffers go back to the system when freed (on GPUs they are GPU memory).
    return _launch([sharded, plain], out, env={"MALLOC_MMAP_THRESHOLD_": str(2**20)})


def test_sharded_loading_reads_the_checkpoint_once_and_trains_as_plain_loading(sharded_loading_run):
    run = sharded_loading_run
    sharded, plain = _records(run, "sharded"), _records(run, "plain")
    assert [r["main_process_loads_weights"] for r in sharded + plain] == [True, True, False, False]
    # rank 1 under sharded loading read no weights
    assert [r["built_without_weights"] for r in sharded + plain] == [False, True, False, False]
    # After prepare the adapters are identical on both processes and to plain loading's: seeded P, Q, lambda 0, masks.
    initial = {
        (name, rank): torch.load(run / f"{name}_initial_rank{rank}.pt")
        for name in ("sharded", "plain")
        for rank in (0, 1)
    }
    reference = initial["plain", 0]
    for which, state in initial.items():
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference), which
    assert all(not value.any() for key, value in reference.items() if key.endswith("lora_lambda"))
    # ... and they train as they do after plain loading.
    for one, other in zip(sharded, plain):
        assert other["history"] and _without_scores(one["history"]) == _without_scores(other["history"])
        assert max(abs(a - b) for a, b in zip(one["losses"], other["losses"])) <= TOLERANCE
    assert _max_difference(torch.load(run / "sharded_final.pt"), torch.load(run / "plain_final.pt")) <= TOLERANCE
    # The non-main process never holds the whole model: its own half of the shards, one parameter in transit, FSDP2's
    # padded copies; after plain loading it holds the model and its shards.
    model_mib = sharded[1]["model_mib"]
    growth = {
        name: records[1]["rss_mib"]["after_prepare"] - records[1]["rss_mib"]["before_loading"]
        for name, records in (("sharded", sharded), ("plain", plain))
    }
    # Measured: 210-217 MiB (its half, 145 MiB, plus transit and padding) against 400 MiB after plain loading, for a
    # 290 MiB model; the bounds leave 44-75 MiB of room for the allocator's noise.
    assert growth["sharded"] < 0.9 * model_mib < model_mib < growth["plain"], (growth, model_mib)
    assert growth["plain"] - growth["sharded"] > 0.4 * model_mib, (growth, model_mib)


# ---- start-up checks and the slot writer, in this process (no launch) ------------------------------------
def test_build_accelerator_refuses_fsdp1(monkeypatch):
    from flexlora.accelerate_setup import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP2 only"):
        build_accelerator()


def test_build_accelerator_detects_launcher_that_started_one_process(monkeypatch):
    from flexlora.accelerate_setup import build_accelerator

    # What `accelerate launch --cpu --num_processes 2` leaves behind in its single process.
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="started only this one"):
        build_accelerator()


def test_build_accelerator_refuses_tensor_parallelism(monkeypatch):
    from flexlora.accelerate_setup import build_accelerator

    # What `accelerate launch` derives from a config whose parallelism_config has tp_size: 2.
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2")
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    with pytest.raises(ValueError, match=r"tensor parallelism \(tp_size=2\)"):
        build_accelerator()


def test_allocator_refuses_adapters_split_by_a_tensor_parallel_mesh(tmp_path, tiny_llama):
    """A P split over a mesh's "tp" dimension (as tensor parallelism would) is refused at start-up, naming the mesh,
    instead of being edited as if its rows were sharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import flexlora

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp_shard", "tp"))
        config = flexlora.FlexLoRAConfig(target_modules=["q_proj", "v_proj"], r=2, b0=1, total_steps=10)
        adapters = flexlora.inject(tiny_llama, config)
        layer = adapters.layers[adapters.names[0]]
        layer.lora_P = torch.nn.Parameter(distribute_tensor(layer.lora_P.detach(), mesh, [Shard(0), Shard(1)]))
        with pytest.raises(NotImplementedError, match=r"\{'dp_shard': 1, 'tp': 1\}: tensor / context parallelism"):
            flexlora.RankAllocator(adapters)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "layout, config, mesh",
    [
        ("fsdp2", "fsdp2_multinode.yaml", ""),
        (
            None,  # the default
            "hsdp_multinode.yaml",
            "--parallelism_config_dp_replicate_size 2 --parallelism_config_dp_shard_size 8",
        ),
        (
            "hsdp",
            "hsdp_multinode.yaml",
            "--parallelism_config_dp_replicate_size 2 --parallelism_config_dp_shard_size 8",
        ),
    ],
)
def test_slurm_launcher_layouts(tmp_path, layout, config, mesh):
    """launch/slurm_multinode.sbatch under stand-ins for srun / scontrol / accelerate: LAYOUT=hsdp, the default,
    launches hsdp_multinode.yaml with a nodes x GPUs-per-node mesh; a LAYOUT it does not know ends it with status 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": "echo node0; echo node1",
        # the head node's address, or one node's task: skip srun's options up to the command, run it as node 0
        "srun": 'case "$*" in *hostname*) echo 10.0.0.1;; *) while [ "$1" != bash ]; do shift; done; '
        'SLURM_NODEID=0 exec "$@";; esac',
        "accelerate": f'echo "$@" > {tmp_path / "accelerate_args"}',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "GPUS_PER_NODE": "8",
    }
    env.pop("CONFIG", None)
    env.pop("LAYOUT", None)
    if layout:
        env["LAYOUT"] = layout
    command = ["bash", str(REPO / "launch" / "slurm_multinode.sbatch"), "recipes/llama3_cr.py", "--config", "c.yaml"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = (
        f"launch --config_file accelerate_configs/{config} --num_machines 2 --num_processes 16 "
        f"--machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 --rdzv_backend c10d {mesh} "
        "recipes/llama3_cr.py --config c.yaml"
    )
    assert (tmp_path / "accelerate_args").read_text().split() == expected.split()
    refused = subprocess.run(command, cwd=REPO, env={**env, "LAYOUT": "tp"}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "unknown LAYOUT=tp" in refused.stderr
    if not layout:  # a config of the user's own, with the layout left to the default: which layout is not guessed
        config = {**env, "CONFIG": "accelerate_configs/deepspeed_zero3.yaml"}
        refused = subprocess.run(command, cwd=REPO, env=config, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "needs LAYOUT" in refused.stderr


@pytest.mark.parametrize("shape, slot_dim", [((5, 7), 1), ((7, 5), 0), ((7,), 0)])
def test_write_slot_through_uneven_flat_pieces(shape, slot_dim):
    """Writing a slot piece by piece (ZeRO-style flat ranges, one straddling rows, one empty) equals writing it
    whole."""
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    expected = full.clone()
    slot = 3
    length = shape[1 - slot_dim] if len(shape) == 2 else 1
    value = torch.linspace(-1.0, 1.0, length)
    expected.select(slot_dim, slot).copy_(value if len(shape) == 2 else value[0])
    flat = full.view(-1)
    bounds = [0, 6, 6, 17, flat.numel()]
    for start, stop in zip(bounds, bounds[1:]):
        fl_dist.write_slot(fl_dist.Piece(flat[start:stop], start, shape), slot, slot_dim, value)
    assert torch.equal(full, expected)
