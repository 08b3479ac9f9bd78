"""Options that matter at scale: DDP buckets overlap backward, frozen scopes and a weightless aux
head need no find_unused_parameters, --sync_batch_norm through the CLI, cudnn.benchmark."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_support import launch_ranks, run_ranks, save_result
from safetensors.torch import load_file
from test_aux_heads import FLAGS, thin_v3_file  # noqa: F401  (a fixture)
from torch import nn

from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.nets.inception import InceptionV3
from slimtune.runtime import Runtime, seed_everything
from slimtune.train.distributed import rank0_then_wait, unused_parameters, wrap_ddp
from slimtune.train.freeze import aux_head_parameters, freeze_aux_head
from slimtune.train.loop import _enable_sync_batch_norm, _forward
from slimtune.train.losses import aux_logits_of, softmax_loss

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore(), timeout=timedelta(seconds=30))
    yield Runtime(torch.device("cpu"), 0, 1)
    dist.destroy_process_group()


def test_gradients_are_all_reduced_while_backward_still_runs(group_of_one):
    """With several buckets, the first all-reduce starts before backward reaches the first layer."""
    torch.manual_seed(0)
    layers = [nn.Linear(64, 64) for _ in range(6)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())])
    ddp = wrap_ddp(model, group_of_one, bucket_cap_mb=64 * 64 * 4 / 2**20)  # about one layer per bucket
    events: list[str] = []

    def recording_hook(state, bucket):
        events.append("all-reduce")
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, recording_hook)
    # The first layer's weight gradient is the last one backward computes.
    layers[0].weight.register_hook(lambda grad: events.append("first layer's gradient"))
    # DDP's first step runs with one first-guess bucket and then sizes them: look at the second.
    for _ in range(2):
        events.clear()
        ddp(torch.randn(8, 64)).square().mean().backward()
    assert events.count("all-reduce") >= 3
    assert events.index("all-reduce") < events.index("first layer's gradient")


def _thin_v3() -> nn.Module:
    torch.manual_seed(0)
    return InceptionV3(2, depth_multiplier=0.1, min_depth=8, image_size=107)


def test_a_weightless_aux_head_is_frozen_so_no_tensor_waits_for_a_gradient():
    images, labels = torch.randn(2, 3, 107, 107), torch.tensor([0, 1])

    def backward(model: nn.Module) -> None:
        logits, end_points = _forward(model.train(), images)
        softmax_loss(logits, labels, 0.0, aux_logits_of(end_points, 0.0), 0.0).backward()

    model = _thin_v3()
    backward(model)
    aux = set(aux_head_parameters(model))
    assert aux and set(unused_parameters(model)) == aux  # what DDP would wait for at the next step

    model = _thin_v3()
    assert freeze_aux_head(model) == len(aux)
    backward(model)
    assert unused_parameters(model) == []
    # Its BatchNorm statistics stay too: the head is not trained.
    norms = [m for n, m in model.named_modules() if ".AuxLogits." in f".{n}." and hasattr(m, "frozen")]
    assert norms and all(m.frozen for m in norms)


@pytest.mark.slow
def test_frozen_scopes_and_a_weightless_aux_head_train_under_ddp_without_find_unused(
        thin_v3_file, cats_vs_dogs, tmp_path):  # noqa: F811
    args = ["train", "--model_name", f"{thin_v3_file}:thin_v3", "--dataset_dir", str(cats_vs_dogs),
            "--train_dir", str(tmp_path / "run"), "--aux_loss_weight", "0",
            "--trainable_scopes", "InceptionV3/Logits,InceptionV3/AuxLogits,InceptionV3/Mixed_7c", *FLAGS]
    ranks = launch_ranks(args, 2, {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}, timeout=600)
    assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    assert "--aux_loss_weight 0: the auxiliary head's" in ranks[0][2]
    trained = load_file(str(tmp_path / "run" / "model.ckpt-2.safetensors"))
    fresh = _thin_v3().state_dict()
    assert not torch.equal(trained["InceptionV3.Logits.Conv2d_1c_1x1.weight"],
                           fresh["InceptionV3.Logits.Conv2d_1c_1x1.weight"])
    assert torch.equal(trained["InceptionV3.AuxLogits.Conv2d_2b_1x1.weight"],
                       fresh["InceptionV3.AuxLogits.Conv2d_2b_1x1.weight"])


BN_NET = '''
from torch import nn

from slimtune.nets.layers import Conv2d, batch_norm_factory


def bn_net(num_classes, **kwargs):
    norm = batch_norm_factory(scale=True, decay=0.9)
    return nn.Sequential(Conv2d(3, 8, 3, stride=2, normalizer=norm), Conv2d(8, 8, 3, stride=2, normalizer=norm),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


bn_net.default_image_size = 28
bn_net.preprocessing = "lenet"
'''


def _bn_args(net: Path, train_dir: Path, batch_size: int, *extra: str) -> list[str]:
    return ["train", "--model_name", f"{net}:bn_net", "--dataset_name", "digits", "--train_dir", str(train_dir),
            "--max_number_of_steps", "5", "--batch_size", str(batch_size), "--num_workers", "0", "--optimizer",
            "sgd", "--learning_rate", "0.1", "--learning_rate_decay_type", "fixed", "--weight_decay", "0",
            "--deterministic", "--nochannels_last", "--save_summaries_secs", "1e9", *extra]


@pytest.mark.slow
def test_sync_batch_norm_flag_trains_two_processes_like_one_on_the_global_batch(tmp_path):
    net = tmp_path / "bn_net.py"
    net.write_text(BN_NET)
    env = {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name, extra in (("synced", ["--sync_batch_norm"]), ("local", [])):
        ranks = launch_ranks(_bn_args(net, tmp_path / name, 4, *extra), 2, env, timeout=600)
        assert [code for code, _, _ in ranks] == [0, 0], ranks[0][2][-3000:]
    assert main(_bn_args(net, tmp_path / "one", 8)) == 0
    one = load_file(str(tmp_path / "one" / "model.ckpt-5.safetensors"))
    synced = load_file(str(tmp_path / "synced" / "model.ckpt-5.safetensors"))
    local = load_file(str(tmp_path / "local" / "model.ckpt-5.safetensors"))
    for name in one:  # weights and moving statistics
        torch.testing.assert_close(synced[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(local["0.BatchNorm.running_var"], one["0.BatchNorm.running_var"], rtol=1e-3)


def test_cudnn_benchmarks_only_when_not_deterministic():
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.benchmark = False
        seed_everything(0, deterministic=False, device=torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark
        seed_everything(0, deterministic=False, device=torch.device("cpu"))  # CPU runs leave it alone
        assert torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(False)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before
        torch.use_deterministic_algorithms(False)


def test_ddp_works_under_bf16_autocast(group_of_one):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    ddp = wrap_ddp(model, group_of_one)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ddp(torch.randn(4, 3, 8, 8))
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float(), torch.tensor([0, 1, 0, 1])).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_sync_batch_norm_refuses_torch_batch_norm_on_cpu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"--sync_batch_norm: 1 torch.nn BatchNorm layers \(1, ...\) synchronize on "
                                          r"CUDA only"):
        _enable_sync_batch_norm(model, Runtime(torch.device("cpu"), 0, 2))


def _slow_save_then_look(rank: int, world_size: int, out_dir: Path) -> None:
    import time

    if rank == 0:
        time.sleep(2)  # a checkpoint that takes a while to write
        (out_dir / "model.ckpt-5.safetensors").write_text("saved")
    rank0_then_wait(Runtime(torch.device("cpu"), rank, world_size))
    save_result(out_dir, rank, {"saw_checkpoint": (out_dir / "model.ckpt-5.safetensors").exists()})


@pytest.mark.slow
def test_the_other_ranks_wait_until_rank_0_has_saved(tmp_path):
    results = run_ranks(_slow_save_then_look, 3, tmp_path)
    assert [result["saw_checkpoint"] for result in results] == [True, True, True]
