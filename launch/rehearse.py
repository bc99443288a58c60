"""Write rehearsal data: a chat model's own answers to general prompts, to replay while fine-tuning it.

    python launch/rehearse.py --model smollm2_135m --prompts general_prompts.txt --out rehearsal.jsonl
    deepspeed launch/train.py +exp=medical model=smollm2_135m regularizer=replay \\
        regularizer.replay.path=rehearsal.jsonl regularizer.replay.objective=instruct

--model: a Hugging Face directory or an imported model's name (launch/import_model.py). Prompts: a
.txt file (a prompt a line) or .jsonl ("prompt", "instruction" + "input", or "messages"). The output
is one {"messages": [user, assistant]} record a line; answers that hit --max-new-tokens are dropped
and counted (trainer/forgetting/rehearsal.py says why). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from trainer.engine.model_import import model_dir_of
from trainer.forgetting import rehearsal


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="model directory, or a known model's name (smollm2_135m)")
    p.add_argument("--prompts", required=True, type=Path, help="general prompts: .txt (one a line) or .jsonl")
    p.add_argument("--out", required=True, type=Path, help="the JSONL to write (refused if it exists, unless --force)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer; longer ones are dropped")
    p.add_argument("--limit", type=int, help="the first N prompts only")
    p.add_argument("--system-prompt", help="a system message for every prompt (default: the template's own)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--keep-cut-off",
        action="store_true",
        help="keep answers cut off at --max-new-tokens (they will be trained to end there)",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out")
    args = p.parse_args(argv)
    if args.out.exists() and not args.force:
        raise SystemExit(f"--out {args.out}: exists; pass --force to overwrite it")
    try:
        prompts = rehearsal.read_prompts(args.prompts)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--prompts: {e}") from None
    prompts = prompts[: args.limit] if args.limit else prompts
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: no prompts in it")
    try:
        model_dir = model_dir_of(args.model)
    except ValueError as e:
        raise SystemExit(f"--model {e}") from None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    started, kept, cut = time.perf_counter(), 0, 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for n, a in enumerate(
                rehearsal.answers(
                    model, tok, prompts, args.max_new_tokens, args.system_prompt, args.temperature, args.seed
                ),
                1,
            ):
                if a.text and (a.finished or args.keep_cut_off):
                    f.write(json.dumps(rehearsal.record(a, args.system_prompt), ensure_ascii=False) + "\n")
                    kept += 1
                else:
                    cut += 1
                if n % 10 == 0 or n == len(prompts):
                    print(
                        f"  {n}/{len(prompts)} prompts, {time.perf_counter() - started:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not kept:
        tmp.unlink()
        raise SystemExit(f"no answer ended within --max-new-tokens={args.max_new_tokens} ({cut} cut off); raise it")
    tmp.replace(args.out)
    print(
        f"wrote {args.out}: {kept} answers of {model_dir.name}; dropped {cut} cut off at {args.max_new_tokens} "
        f"new tokens or empty ({time.perf_counter() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
