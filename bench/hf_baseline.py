"""The baseline of bench/throughput.py: the Hugging Face `Trainer` with a DeepSpeed ZeRO-3 config and
padded batches, as most users run SFT today. Launched per rank by `deepspeed --num_gpus N`:

    deepspeed --num_gpus 2 bench/hf_baseline.py --model INIT_DIR --data samples.npz --out DIR --batch-size 5

- the model: `from_pretrained(INIT_DIR)` after `TrainingArguments(deepspeed=...)`, so it loads under
  `deepspeed.zero.Init` (the same starting weights as our trainer, which reads model.name_or_path);
- the data: the same tokenized samples as ours (input_ids, and labels with -100 where no loss is
  taken), one sample per row, shuffled by the Trainer's sampler, padded to the longest sample of
  each micro-batch by `DataCollatorForSeq2Seq` (dynamic padding, not padding to max length);
- the DeepSpeed config: the ZeRO-3 example of the transformers DeepSpeed docs ("auto" values filled
  in by the Trainer); AdamW, betas, eps, clipping and the warmup + constant learning rate exactly as ours;
- the loss: transformers' token-count normalisation over the step on all ranks
  (`average_tokens_across_devices`), the same objective as ours.

Measured (written by rank 0 to OUT/hf_baseline.json): per optimizer step, the wall time between
consecutive step ends (so data loading, the collator and the Trainer's own per-step work count, as
the data wait counts in ours), the real (non-padding) and supervised tokens of the step on all
ranks, and the step's loss (sum of token losses over supervised tokens, all ranks); each rank's
peak memory (peak RSS on CPU, max allocated on a GPU). The final weights go to OUT/hf for the
held-out evaluation.

On CPU each rank uses cores / ranks threads, as our trainer does (trainer/distributed/launcher.py), so that
the comparison is about batching, not thread oversubscription.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face directory of the starting model and tokenizer")
    p.add_argument("--data", required=True, help=".npz of tokenized samples (ids, supervised, offsets)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, required=True, help="samples per rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; -1 = one epoch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--attn", default="sdpa", help="attn_implementation")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


class Samples(torch.utils.data.Dataset):
    """Tokenized samples from an .npz: ids and supervised flags concatenated, sample i at
    offsets[i]:offsets[i+1]."""

    def __init__(self, path: str) -> None:
        z = np.load(path)
        self.ids, self.sup, self.offsets = z["ids"], z["supervised"], z["offsets"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b].astype(np.int64)
        return {"input_ids": ids.tolist(), "labels": np.where(self.sup[a:b], ids, -100).tolist()}


def ds_config(on_gpu: bool) -> dict:
    """The ZeRO-3 example config of the transformers DeepSpeed integration docs."""
    return {
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": on_gpu,
            "contiguous_gradients": True,
            "sub_group_size": 1e9,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def main() -> None:
    args = parse_args()
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    on_gpu = torch.cuda.is_available()
    local_world = int(
        os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or 1
    )
    if not on_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    transformers.logging.set_verbosity_warning()
    import deepspeed

    from trainer.distributed.ops import release_shm_buffer

    # Before the model is built: zero.Init reads the world size from the process group.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    release_shm_buffer()  # DeepSpeed leaves its CPU all-reduce buffers in /dev/shm otherwise
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(args.out)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.warmup,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=args.adam_beta2,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not on_gpu,
        bf16=args.bf16,
        deepspeed=ds_config(on_gpu),
        dataloader_drop_last=True,
        remove_unused_columns=False,
        gradient_checkpointing=args.gradient_checkpointing,
        disable_tqdm=True,
    )
    # After TrainingArguments(deepspeed=ZeRO-3): from_pretrained partitions under zero.Init.
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, attn_implementation=args.attn
    )
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    steps: list = []  # per optimizer step, this rank: [real tokens, supervised tokens, loss sum, row slots]
    step_ends: list = []

    class Measured(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            with torch.no_grad():  # the token-loss sum our trainer logs; row by row, so the extra memory is one
                labels = inputs["labels"][:, 1:]  # row's log-softmax (and the FLOPs ~5 x vocab a token: noise)
                loss_sum = sum(
                    torch.nn.functional.cross_entropy(
                        outputs.logits[i, :-1].float(), labels[i], ignore_index=-100, reduction="sum"
                    )
                    for i in range(labels.size(0))
                )
                counts = [
                    float(inputs["attention_mask"].sum()),
                    float((labels != -100).sum()),
                    float(loss_sum),
                    float(inputs["input_ids"].numel()),
                ]
            if len(steps) <= self.state.global_step:
                steps.append([0.0, 0.0, 0.0, 0.0])
            steps[self.state.global_step] = [a + b for a, b in zip(steps[self.state.global_step], counts)]
            return (loss, outputs) if return_outputs else loss

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = warmup_constant(optimizer or self.optimizer, args.warmup)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    trainer = Measured(
        model=model, args=training_args, train_dataset=Samples(args.data), data_collator=collator, callbacks=[Clock()]
    )
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    write_report(out / "hf_baseline.json", trainer, steps, step_ends, train_s, on_gpu, {"batch_size": args.batch_size})


def warmup_constant(optimizer, warmup: int):
    """Our schedule exactly: linear warmup reaching the peak at step warmup-1, then constant
    (transformers' constant_with_warmup starts at 0 and reaches it one step later)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)


def write_report(path: Path, trainer, steps: list, step_ends: list, train_s: float, on_gpu: bool, extra: dict) -> None:
    """Every rank: its peak memory and per-step counts, summed over ranks; the final weights to
    OUT/hf; rank 0 writes `path`. steps: per optimizer step, this rank's [real tokens, supervised
    tokens, token-loss sum, row slots]; step_ends: the clock at train begin and at each step end."""
    peak_gb = (
        torch.cuda.max_memory_allocated() / 2**30
        if on_gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )

    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    totals = torch.tensor(steps, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    mem = torch.zeros(world, dtype=torch.float64, device=device)
    mem[rank] = peak_gb
    dist.all_reduce(mem)
    trainer.save_model(
        str(path.parent / "hf")
    )  # ZeRO-3: gathers the weights (stage3_gather_16bit_weights_on_model_save)
    if rank == 0:
        times = np.diff(step_ends).tolist()
        rows = [
            {
                "step": i + 1,
                "step_time_s": times[i],
                "tokens": t[0],
                "supervised_tokens": t[1],
                "loss": t[2] / max(t[1], 1.0),
                "slots": t[3],
            }
            for i, t in enumerate(totals.tolist())
        ]
        path.write_text(
            json.dumps(
                {"world_size": world, "train_s": train_s, **extra, "peak_mem_gb_per_rank": mem.tolist(), "steps": rows},
                indent=1,
            )
        )
    # Leave the gloo group before the interpreter exits: left to teardown, its threads can abort the
    # process ("terminate called without an active exception", exit -6) after the work is done.
    from trainer.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    sys.exit(main())
