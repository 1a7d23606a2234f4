"""Training under `accelerate launch`: the configs in configs/accelerate/ as accelerate itself
reads and launches them, the launcher checks of `training_arguments`, and a real two-process CPU
launch of `chatretriever train` that makes the same step as one process over the global batch
(so the in-batch negatives were gathered across the processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import (
    _assert_same_update,
    _first_step,
    _free_port,
    _hand_loss,
    _initial_retriever,
    _recipe,
    _relevance_rows,
    _trainable,
    _trainable_of,
)

from chatretriever.methods.chatretriever.recipe import load_recipe, run_training
from chatretriever.modeling.distributed import accelerator_visible
from chatretriever.modeling.trainer import training_arguments

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / f"{name}.yaml"))


def test_every_config_is_one_accelerate_reads():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == [
        "cpu-2proc",
        "deepspeed-zero2",
        "multi-gpu",
        "multi-node",
    ]
    want = {  # name: (distributed_type, num_processes, num_machines, use_cpu)
        "multi-gpu": ("MULTI_GPU", 8, 1, False),
        "multi-node": ("MULTI_GPU", 16, 2, False),
        "deepspeed-zero2": ("DEEPSPEED", 8, 1, False),
        "cpu-2proc": ("MULTI_GPU", 2, 1, True),
    }
    for name, (kind, procs, machines, cpu) in want.items():
        c = _config(name)
        assert (c.distributed_type.value, c.num_processes, c.num_machines) == (
            kind,
            procs,
            machines,
        )
        assert (c.use_cpu, c.machine_rank, c.compute_environment.value) == (
            cpu,
            0,
            "LOCAL_MACHINE",
        )
        # the string "no", not YAML's `no` (False): the recipe's retriever.dtype sets precision
        assert c.mixed_precision == "no", name
        if kind != "DEEPSPEED":
            assert c.deepspeed_config == {}, name
    ds = _config("deepspeed-zero2").deepspeed_config
    assert ds == {
        "zero_stage": 2,
        "offload_optimizer_device": "none",
        "offload_param_device": "none",
        "zero3_init_flag": False,
    }
    node = _config("multi-node")
    assert node.main_process_ip.endswith(".invalid") and node.main_process_port == 29500


def _launch_plan(monkeypatch, config: str, *argv: str):
    """(the launcher accelerate picks, its arguments, the environment it gives the processes)
    for `accelerate launch --config_file CONFIG ARGV -m chatretriever train r.yaml`: accelerate's
    own `launch_command`, stopped where it would start processes."""
    import accelerate.commands.launch as launch
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    seen = {}
    for name in ("deepspeed_launcher", "multi_gpu_launcher", "simple_launcher"):
        monkeypatch.setattr(launch, name, lambda a, name=name: seen.update(launcher=name, args=a))
    argv = ("--config_file", str(CONFIGS / f"{config}.yaml"), *argv)
    launch.launch_command(
        launch.launch_command_parser().parse_args([*argv, "-m", "chatretriever", "train", "r.yaml"])
    )
    args = seen["args"]
    if seen["launcher"] == "deepspeed_launcher":
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return seen["launcher"], args, env


def test_launch_plans_of_the_configs(monkeypatch):
    """What each config starts, read from accelerate's launcher (no GPU, no DeepSpeed needed)."""
    launcher, args, env = _launch_plan(monkeypatch, "multi-gpu")
    assert (launcher, args.nproc_per_node, args.module) == ("multi_gpu_launcher", "8", True)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"

    # torchrun, not the one-process launcher that a MULTI_CPU config without mpirun gets
    launcher, args, env = _launch_plan(monkeypatch, "cpu-2proc")
    assert (launcher, args.nproc_per_node, env["ACCELERATE_MIXED_PRECISION"]) == (
        "multi_gpu_launcher",
        "2",
        "no",
    )

    port = _free_port()
    argv = ("--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port")
    launcher, args, _ = _launch_plan(monkeypatch, "multi-node", *argv, str(port))
    assert (launcher, args.nnodes, args.node_rank, args.nproc_per_node) == (
        "multi_gpu_launcher",
        "2",
        1,
        "8",
    )
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", f"10.0.0.1:{port}")

    launcher, args, env = _launch_plan(monkeypatch, "deepspeed-zero2")
    assert (launcher, args.nproc_per_node) == ("deepspeed_launcher", "8")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    # batch size, accumulation and clipping are left to the recipe (DeepSpeed's "auto")
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    assert "ACCELERATE_GRADIENT_CLIPPING" not in env


def test_training_arguments_refuse_a_launcher_precision_and_lone_processes(tmp_path, monkeypatch):
    args = training_arguments(tmp_path, {})
    assert args.use_cpu is not accelerator_visible() and args.world_size == 1  # CPU if no GPU
    assert not training_arguments(tmp_path, {"use_cpu": False}).use_cpu  # a setting wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="mixed_precision=bf16.*retriever.dtype"):
        training_arguments(tmp_path, {})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    # a launcher's WORLD_SIZE, and transformers starts no process group (use_cpu off, no GPU):
    # each process would train alone on all the data
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launched as 2 processes but training in a group of 1"):
        training_arguments(tmp_path, {"use_cpu": False})


def _accelerate_train(recipe: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file cpu-2proc.yaml -m chatretriever train RECIPE` (fp32)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    cmd += ["--config_file", str(CONFIGS / "cpu-2proc.yaml")]
    cmd += ["-m", "chatretriever", "train", str(recipe), "--set", "retriever.dtype=fp32"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_accelerate_launch_step_equals_one_process_over_the_global_batch(tmp_path, tiny_llama_dir):
    """Two accelerate-launched CPU processes x 2 examples == one process x 4 examples: the same
    LoRA and EMB rows after one SGD step, and the logged loss is the one worked out by hand over
    the global batch (each example's relevant passages sit in the other process's half whatever
    the split). The recipe leaves use_cpu unset: the trainer picks the CPU itself."""
    sgd = {"max_steps": 1, "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0}
    common = {"rows": _relevance_rows(), "repeat": 1, **sgd}
    launched = _recipe(
        tmp_path / "acc", tiny_llama_dir, per_device_train_batch_size=2, use_cpu=None, **common
    )
    done = _accelerate_train(launched)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved ") == 2  # both processes ran the command to its end
    one = _recipe(tmp_path / "one", tiny_llama_dir, per_device_train_batch_size=4, **common)
    cfg = load_recipe(one, ["retriever.dtype=fp32"])
    single = _trainable(run_training(cfg))
    multi = _trainable(tmp_path / "acc" / "run")
    _assert_same_update(multi, single, _trainable_of(_initial_retriever(cfg)))
    first, hand = _first_step(tmp_path / "acc" / "run"), _hand_loss(cfg)
    logged = first["loss"]  # the mean over the processes
    assert logged == pytest.approx(sum(hand.values()), rel=1e-4, abs=1e-4)
    for name, value in hand.items():  # each part too (it was the first process's alone)
        assert first[f"loss_{name}"] == pytest.approx(value, rel=1e-4, abs=1e-4), name


def _names_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from chatretriever.modeling.trainer import _all_part_names

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:  # a UniConv batch without references leaves its generation parts out on one process
        mine = ["contrastive", "grounded", "cii"] if rank == 0 else ["contrastive"]
        Path(out, f"{rank}.json").write_text(json.dumps(_all_part_names(mine)))
    finally:
        dist.destroy_process_group()


def test_processes_logging_different_loss_parts_agree_on_the_names(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_names_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    names = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert names == [["cii", "contrastive", "grounded"]] * 2
