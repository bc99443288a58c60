"""System (d) of bench/throughput.py: TRL's `SFTTrainer` with best-fit-decreasing packing and
padding-free batches, the strongest packed-SFT peer, on the same DeepSpeed ZeRO-3 config, data,
seed, optimizer and schedule as (b) (bench/hf_baseline.py). Launched per rank by `deepspeed --num_gpus N`:

    deepspeed --num_gpus 2 bench/trl_baseline.py --model INIT_DIR --data train_messages.jsonl \\
        --out DIR --seq-len 1024 --batch-size 1 --max-steps 16

- the data: the conversations of our training set ({"messages": [...]}, one per line), tokenized by
  TRL itself with the model's chat template (TRL's own tokenization and masking, as a user runs it);
- the loss: `assistant_only_loss=True` with a copy of the model's chat template that has
  `{% generation %}` markers around each assistant turn's content and end-of-turn text (TRL 1.16
  refuses templates without them, SmolLM2's among them), which is exactly what our data pipeline
  supervises (data_pipeline/tokenization.py: the text between the generation prompt and the end of
  the turn); so both systems train on the same supervised tokens, and the counts are written out
  for bench/throughput.py to check;
- packing: `packing=True`, `packing_strategy="bfd"` (TRL's default: best-fit decreasing, overlong
  samples truncated to --seq-len), `padding_free=True` (each micro-batch one flattened row with
  per-document position_ids, no padding), `per_device_train_batch_size` = packed rows per micro-batch;
- the model: `from_pretrained(INIT_DIR)` after `SFTConfig(deepspeed=...)`, so it loads under
  `deepspeed.zero.Init`; the DeepSpeed config is (b)'s, `train_batch_size: "auto"` included. That
  needs the process group up before `SFTConfig` (as in (b)): built first, DeepSpeed sees world size 1
  while the model is built and its batch check fails ("train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size 2 != 1 * 1 * 1"), which is why a first
  trial (issue 16) had to drop the key;
- the schedule: (b)'s (and ours) linear warmup to the peak at step warmup-1, then constant;
- activation checkpointing off, as in ours and (b) by default (--gradient-checkpointing turns it on:
  TRL's SFTConfig has it on by default, TrainingArguments off).

Measured exactly as (b) (written by rank 0 to OUT/trl_baseline.json): per optimizer step the wall
time between step ends, the real tokens (every position: padding-free batches have no padding),
the supervised tokens and the summed token loss of all ranks; each rank's peak memory (peak RSS on
CPU, max allocated on a GPU); and the packed training set's totals (samples, rows, tokens,
supervised tokens). The final weights go to OUT/hf for the held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import hf_baseline  # bench/ is this script's directory: (b)'s DeepSpeed config, schedule and report
import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face directory of the starting model and tokenizer")
    p.add_argument("--data", required=True, help="JSON lines of {'messages': [...]} conversations")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, required=True, help="max_length: the length of a packed row")
    p.add_argument("--batch-size", type=int, required=True, help="packed rows per rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; -1 = one epoch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--attn", default="sdpa", help="attn_implementation")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="activation checkpointing (TRL's SFTConfig default; off here, as in ours and (b))",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


# The templates this benchmark knows, each as (what the model's template says, the same with
# generation markers on the assistant turn's content + end-of-turn text). Rendering is unchanged:
# the markers only tell transformers which characters are the assistant's (return_assistant_tokens_mask).
_CHATML = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_CHATML_MARKED = (
    "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}{% else %}"
    "{{message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
)
_TINY = "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"  # trainer/engine/tokenizer.py's TINY_CHAT_TEMPLATE
_TINY_MARKED = (
    "<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
)
MARKABLE = {"ChatML (SmolLM2, Qwen2)": (_CHATML, _CHATML_MARKED), "tiny": (_TINY, _TINY_MARKED)}


def marked_chat_template(template: str) -> str:
    """`template` with {% generation %} markers around each assistant turn's content and end-of-turn
    text, or a ValueError for a template this benchmark does not know (and a template that already
    has markers, as is)."""
    from trl.chat_template_utils import has_generation_markers

    if has_generation_markers(template):
        return template
    for plain, marked in MARKABLE.values():
        if template.count(plain) == 1:
            return template.replace(plain, marked)
    raise ValueError(
        "bench/trl_baseline.py: this model's chat template has no {% generation %} markers and is not one "
        f"it knows how to mark ({', '.join(MARKABLE)}); add its assistant-turn expression to MARKABLE"
    )


def main() -> None:
    args = parse_args()
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    local_world = int(
        os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or 1
    )
    if not on_gpu:  # cores / ranks threads each, as ours and (b)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    transformers.logging.set_verbosity_warning()
    import deepspeed

    from trainer.distributed.ops import release_shm_buffer

    # Before SFTConfig and the model: zero.Init and DeepSpeed's batch check read the world size from
    # the process group (without it they see 1 and reject train_batch_size = micro x accum x N).
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    release_shm_buffer()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(args.out)
    training_args = SFTConfig(
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
        deepspeed=hf_baseline.ds_config(on_gpu),
        dataloader_drop_last=True,
        disable_tqdm=True,
        # SFTConfig turns activation checkpointing on by default (TrainingArguments does not): off
        # unless asked, so (d) recomputes no more than ours and (b) do
        gradient_checkpointing=args.gradient_checkpointing,
        # TRL's packed SFT: BFD packing into rows of max_length, padding-free batches, loss on the
        # assistant turns only (the marked template below)
        max_length=args.seq_len,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, attn_implementation=args.attn
    )
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.chat_template = marked_chat_template(tokenizer.chat_template)
    # In memory (no datasets cache files for two ranks to race on); TRL tokenizes and packs it.
    dataset = Dataset.from_list(
        [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    )

    steps: list = []  # per optimizer step, this rank: [real tokens, supervised tokens, loss sum, positions]
    step_ends: list = []

    class Measured(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # TRL's loss never builds the logits (a fused LM head); it is sum(token losses) /
            # num_items_in_batch x ranks (the step's supervised tokens on all ranks; the gradients are
            # averaged over ranks), so the token-loss sum our trainer logs is recovered exactly.
            labels = inputs["labels"][:, 1:]
            loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            supervised = float((labels != -100).sum())
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss_sum = float(loss.detach()) * float(num_items_in_batch) / self.accelerator.num_processes
            elif num_items_in_batch is not None:
                loss_sum = float(loss.detach()) * float(num_items_in_batch)
            else:
                loss_sum = float(loss.detach()) * supervised
            counts = [float(inputs["input_ids"].numel()), supervised, loss_sum, float(inputs["input_ids"].numel())]
            if len(steps) <= self.state.global_step:
                steps.append([0.0, 0.0, 0.0, 0.0])
            steps[self.state.global_step] = [a + b for a, b in zip(steps[self.state.global_step], counts)]
            return loss

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = hf_baseline.warmup_constant(optimizer or self.optimizer, args.warmup)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    trainer = Measured(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()]
    )
    packed = trainer.train_dataset
    data = {
        "samples": len(dataset),
        "packed_rows": len(packed),
        "tokens": int(sum(len(ids) for ids in packed["input_ids"])),
        "supervised_tokens": int(sum(sum(1 for t in labels if t != -100) for labels in packed["labels"])),
    }
    # The token budget is one epoch: as many steps as the packed rows fill (TRL's BFD may pack the
    # samples into a row or two fewer than ours; a second epoch must not top them up).
    world = int(os.environ.get("WORLD_SIZE", 1))
    epoch_steps = len(packed) // (args.batch_size * args.grad_accum * world)
    if args.max_steps < 0 or args.max_steps > epoch_steps:
        trainer.args.max_steps = epoch_steps
    data["max_steps"] = trainer.args.max_steps
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    hf_baseline.write_report(
        out / "trl_baseline.json",
        trainer,
        steps,
        step_ends,
        train_s,
        on_gpu,
        {"batch_size": args.batch_size, "data": data},
    )


if __name__ == "__main__":
    sys.exit(main())
