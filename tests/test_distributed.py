"""DDP and FSDP2 (fully_shard) on two gloo processes on CPU: a few training steps of a model of
FusedLoRALinear layers (dense and NF4 bases) give the weights of the single-process run on the
whole batch."""

from __future__ import annotations

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lorakern

STEPS, LR = 3, 0.5


def make_model(base_quant=None):
    torch.manual_seed(0)
    model = nn.Sequential(
        lorakern.FusedLoRALinear(32, 48, r=4, lora_alpha=8, init_lora_weights=False, backend="reference",
                                 base_quant=base_quant),
        nn.ReLU(),
        lorakern.FusedLoRALinear(48, 16, r=8, lora_alpha=8, init_lora_weights=False, backend="reference"),
    )
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 32, generator=g)


def train(model, x, params):
    opt = torch.optim.SGD(params, lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, world, port, mode, base_quant, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = make_model(base_quant)
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if isinstance(layer, lorakern.FusedLoRALinear):
                    fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        x = data()[rank::world]  # equal shards: the mean of the shard losses' grads = the full-batch grad
        train(wrapped, x, [p for p in wrapped.parameters() if p.requires_grad])
        final = {}
        for n, p in trainable(model).items():
            final[n] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if rank == 0:
            torch.save({n: t.clone() for n, t in final.items()}, out_path)
        del wrapped, model, final
        gc.collect()  # DDP's reducer / FSDP's state hold the process group: release them first
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: c10d/gloo threads still being torn down at exit sometimes
    # abort the process (std::terminate) after the work is done and checked; errors above still raise.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode,base_quant", [("ddp", None), ("ddp", "nf4"), ("fsdp2", None)])
def test_distributed_matches_single_process(tmp_path, mode, base_quant):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    single = make_model(base_quant)
    train(single, data(), list(trainable(single).values()))
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), mode, base_quant, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    want = trainable(single)
    assert set(got) == set(want)
    for n, p in want.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=f"{mode}: {n}")
    assert any((p.detach() != make_model(base_quant).state_dict()[n]).any() for n, p in want.items()), \
        "training must have changed the adapters"
