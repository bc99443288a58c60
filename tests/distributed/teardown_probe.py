"""A 2-rank process that ends the way launch/train.py ends, for tests/distributed/test_teardown.py.

It does what leaves gloo's worker threads holding tensors at the end of a run: a ZeRO-3 engine
(partitioned parameters, asynchronous all-gathers), a training step and an eval forward, then one
more asynchronous all-gather whose work the trainer never waits for. Then it leaves the process
group and ends the process: `--exit finish` through trainer.distributed.finish (the entry point's
path), `--exit interpreter` by returning to the interpreter (the path that aborted with "terminate
called without an active exception" under CPU load).
"""

import argparse

import torch

from trainer import distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exit", choices=["finish", "interpreter"], default="finish")
    args = parser.parse_args()

    import deepspeed

    dist = distributed.init(timeout_s=120)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    x = torch.randn(2, 64)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        engine.eval()
        engine(x)
    # A work gloo's thread still holds when the trainer is done: its tensors reach Python objects.
    out = [torch.empty(1 << 16) for _ in range(dist.world_size)]
    torch.distributed.all_gather(out, torch.randn(1 << 16), async_op=True)
    distributed.shutdown()
    print(f"rank {dist.rank} done", flush=True)
    if args.exit == "finish":
        distributed.finish(0)


if __name__ == "__main__":
    main()
