"""recoup export ARTIFACT --format hf|compressed-tensors|gguf --out DIR [--dtype] [--recovery DIR] [--merge] [--gguf-type]"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from recoup.artifact.export import FORMATS, GGUF_TYPES
    from recoup.artifact.export.base import DTYPES

    p = sub.add_parser("export", help="write a compressed artifact (and its recovery) in a format servers load",
                       description="Export a recoup artifact: hf (dense safetensors: transformers), "
                                   "compressed-tensors (integer codes: vLLM, SGLang, transformers), "
                                   "gguf (Q4_0/Q4_1/Q8_0 blocks from the same codes: llama.cpp, Ollama).")
    p.add_argument("artifact", help="a recoup artifact directory (the --out of `recoup compress`)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS.names())}")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--dtype", default=None,
                   help=f"{' | '.join(DTYPES)}: unquantized tensors and scales (default: the artifact's dtype)")
    p.add_argument("--recovery", default=None,
                   help="a saved recovery (LoRA, soft prompt, ...) to write beside the model as OUT/recovery, "
                        "its base_model_name_or_path pointing at OUT")
    p.add_argument("--merge", action="store_true",
                   help="merge the --recovery LoRA into the weights (--format hf only; the result is dense)")
    p.add_argument("--gguf-type", default=None,
                   help=f"GGUF type of the quantized linears: {', '.join(GGUF_TYPES)} "
                        "(default: the type the artifact's grid maps onto exactly, else the --dtype float type)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.artifact.export import ExportConfig, export

    config = ExportConfig.from_dict({"source": args.artifact, "format": args.format, "out": args.out,
                                     "dtype": args.dtype, "recovery": args.recovery, "merge": args.merge,
                                     "gguf_type": args.gguf_type})
    result = export(config)
    types = result.get("tensor_types") or result["plan"]
    print(f"wrote {result['out']} ({result['format']}, {result['bytes'] / 1e6:.1f} MB, {result['seconds']:.1f}s): {types}")
    if result.get("recovery"):
        print(f"recovery beside it: {result['recovery']} (peft.AutoPeftModelForCausalLM.from_pretrained loads both)")
    print(f"loads in: {result['loader']}")
    return 0
