"""FlexLoRA under real multi-process engines on CPU (gloo): DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Each engine is one launch of tests/distributed/worker.py with the accelerate config a user would use
(accelerate_configs/cpu_*.yaml); DDP is launched as two "machines" of one process each on loopback, the way
launch/slurm_multinode.sbatch launches nodes. Every result is compared with one process training the same
scenarios on the same global batches (same worker, no launcher). Launches are module-scoped fixtures: about
15 s of imports each, so each engine runs all its scenarios in one launch.
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

from flexlora import distributed as fl_dist

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed" / "worker.py"
CONFIGS = REPO / "accelerate_configs"
TOLERANCE = 1e-5  # fp32; the engines differ only in reduction order
LAUNCH_TIMEOUT = 300

SCENARIOS = {
    "single": ["entropy", "sensitivity", "small"],
    "ddp": ["entropy", "sensitivity", "small"],
    "fsdp2": ["entropy", "sensitivity"],
    "zero2": ["entropy", "small"],
    "zero3": ["entropy"],
}
SHARDED = {"fsdp2", "zero3"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _launch(commands: list[list[str]], out: Path, port: int | None = None) -> Path:
    """Run the commands (one per machine) and wait; raise with their logs if any fails.

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
        procs.append(subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
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
        tails = "\n".join(f"--- {out}/launch{i}.log ---\n" + (out / f"launch{i}.log").read_text()[-4000:] for i in failed)
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
        elif engine == "ddp":
            port = _free_port()
            machines = [
                _accelerate(
                    "cpu_ddp.yaml", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "c10d",
                    *_worker("ddp", out),
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


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
def test_two_processes_match_one_process(runs, engine):
    run, reference = runs(engine), runs("single")
    for scenario in SCENARIOS[engine]:
        ranks = _records(run, scenario)
        (single,) = _records(reference, scenario)
        assert [r["world"] for r in ranks] == [2, 2], f"{engine}/{scenario}: silently ran another number of processes"
        assert {r["distributed_type"] for r in ranks} == {{"ddp": "MULTI_CPU", "fsdp2": "FSDP"}.get(engine, "DEEPSPEED")}
        # Every rank took exactly the same decisions (scores included: they come from the same gathered lambda).
        assert ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["history"] == ranks[1]["history"]
        history = ranks[0]["history"]
        assert len({c["step"] for c in history}) >= 2 and {c["action"] for c in history} == {"prune", "expand"}
        # ... and the same as one process; the scores agree up to reduction order.
        assert ranks[0]["masks"] == single["masks"], f"{engine}/{scenario}"
        assert _without_scores(history) == _without_scores(single["history"]), f"{engine}/{scenario}"
        assert max(abs(a["score"] - b["score"]) for a, b in zip(history, single["history"])) < 1e-6
        difference = _max_difference(torch.load(run / f"{scenario}_adapter.pt"), torch.load(reference / f"{scenario}_adapter.pt"))
        assert difference <= TOLERANCE, f"{engine}/{scenario}: final adapter differs by {difference:.3g}"


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
def test_allocation_moves_only_lambda(runs, engine):
    """Per allocation step: one all-gather of one flat buffer of the local lambdas when lambda is sharded (none
    when replicated), plus the 16-byte decision check, and nothing else."""
    for scenario in SCENARIOS[engine]:
        for record in _records(runs(engine), scenario):
            n, capacity = record["num_modules"], record["capacity"]
            expected = []
            if engine in SHARDED:
                sent, _ = fl_dist.lambda_gather_payload(n, capacity, world=2)
                expected.append(["c10d._allgather_base_", sent * 4])  # float32
                assert sent == n * math.ceil(capacity / 2)
            if scenario == "sensitivity" and engine in SHARDED:
                expected.append(["c10d.allreduce_", n * capacity * 8])  # per-slot partial sums, float64
            expected.append(["c10d.allreduce_", 16])  # decision digest: two int64
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
    difference = _max_difference(torch.load(single / "resume_sharded_adapter.pt"), torch.load(single / "resume_self_adapter.pt"))
    assert difference <= TOLERANCE


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


@pytest.mark.parametrize("shape, slot_dim", [((5, 7), 1), ((7, 5), 0), ((7,), 0)])
def test_write_slot_through_uneven_flat_pieces(shape, slot_dim):
    """Writing a slot piece by piece (ZeRO-style flat ranges, one straddling rows, one empty) equals writing it whole."""
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
