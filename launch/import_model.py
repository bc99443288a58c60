"""Import a GGUF checkpoint as a Hugging Face model directory (once; nothing is downloaded).

    python launch/import_model.py smollm2_135m          # a known model: the GGUF its package ships,
                                                        # into $FULLFT_CACHE/models/ (model=smollm2_135m)
    python launch/import_model.py FILE.gguf OUT_DIR     # any GGUF transformers can de-quantise

The weights are de-quantised to fp32 and saved as safetensors with the config, tokenizer, chat
template and generation config; the saved model's logits are checked against the GGUF-loaded
model's before the directory is renamed into place (see trainer/engine/model_import.py).
"""

from __future__ import annotations

import argparse
import sys

from trainer.engine.model_import import KNOWN, ImportReport, import_gguf, import_known


def _print_report(report: ImportReport) -> None:
    print(
        f"imported {report.gguf_file} -> {report.out_dir}\n"
        f"  architecture {report.architecture}, {report.parameters:,} parameters, vocab {report.vocab_size:,}, "
        f"tied embeddings: {'yes' if report.tied_embeddings else 'no'}\n"
        f"  logits of the saved model vs the GGUF's: max |diff| {report.logits_max_abs_diff:.3g}\n"
        f"  sha256 {report.gguf_sha256}, transformers {report.transformers_version}, gguf {report.gguf_version}\n"
        f"  {report.seconds:.0f} s (de-quantise, save, reload, check)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help=f"a .gguf file, or a known model: {', '.join(sorted(KNOWN))}")
    parser.add_argument("out_dir", nargs="?", help="directory to create (required for a .gguf file)")
    args = parser.parse_args(argv)
    try:
        if args.source in KNOWN and args.out_dir is None:
            report, out_dir = import_known(args.source)
            if report is None:
                print(f"{args.source} is already imported: {out_dir} (model={args.source} uses it)")
                return 0
        elif args.out_dir is None:
            parser.error(
                f"{args.source!r} is not a known model ({', '.join(sorted(KNOWN))}); for a GGUF file "
                "give both FILE.gguf and OUT_DIR"
            )
        else:
            report = import_gguf(args.source, args.out_dir)
    except (OSError, ValueError, KeyError, ModuleNotFoundError) as ex:
        print(f"import_model: {ex.args[0] if isinstance(ex, KeyError) else ex}", file=sys.stderr)
        return 1
    _print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
