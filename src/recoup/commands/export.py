"""recoup export ARTIFACT --format hf|compressed-tensors|gguf --out DIR [--dtype] [--recovery DIR] [--merge]
[--gguf-type]

The flags are the keys of the export job (:class:`recoup.recipe.jobs.ExportJob`), generated from it: the same
names a recipe's ``export:`` step takes.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from recoup.commands.flags import add_job_arguments

    p = sub.add_parser(
        "export",
        help="write a compressed artifact (and its recovery) in a format servers load",
        description="Export a recoup artifact: hf (dense safetensors: transformers), "
        "compressed-tensors (integer codes: vLLM, SGLang, transformers), "
        "gguf (Q4_0/Q4_1/Q8_0 blocks from the same codes: llama.cpp, Ollama). Every "
        "flag is also a key of a recipe's export step.",
    )
    add_job_arguments(p, "export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.commands.flags import job_from_args
    from recoup.runs.stages import export

    result = export(job_from_args(args, "export"))
    types = result.get("tensor_types") or result["plan"]
    print(
        f"wrote {result['out']} ({result['format']}, {result['bytes'] / 1e6:.1f} MB, {result['seconds']:.1f}s): {types}"
    )
    if result.get("recovery"):
        print(f"recovery beside it: {result['recovery']} (peft.AutoPeftModelForCausalLM.from_pretrained loads both)")
    print(f"loads in: {result['loader']}")
    return 0
