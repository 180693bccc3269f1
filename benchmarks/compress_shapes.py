"""The compression engine at real LLM shapes: seconds per decoder layer and peak device memory.

The bundled model is 135M parameters; users compress 7B-13B models. This builds decoder layers of a
real model's shape (random weights, a 1,000-token vocabulary: the layers are what cost), draws random
calibration tokens, and runs the engine exactly as ``recoup compress --device cuda`` does: the model
stays on the CPU and each decoder layer is offloaded to the device, compressed and moved back.
Method time per layer does not depend on the weights' values, so a model of N layers costs about
N x the per-layer figure plus the capture. Prints a table and writes JSON.

    python benchmarks/compress_shapes.py --shape llama-7b --layers 2 --nsamples 128 --seqlen 2048 \\
        --methods sparsegpt-50,wanda-50,gptq-w4g128,awq-w4g128,sparsegpt-50+w4g128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
}

METHODS = {
    "magnitude-50": dict(method="magnitude", sparsity=0.5),
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "rtn-w4g128": dict(method="rtn", bits=4, group_size=128),
    "gptq-w4g128": dict(method="gptq", bits=4, group_size=128),
    "awq-w4g128": dict(method="awq", bits=4, group_size=128),
    "sparsegpt-50+w4g128": dict(method="sparsegpt", sparsity=0.5, bits=4, group_size=128),
}


def build(shape: str, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from recoup.model.load import LoadedModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, num_hidden_layers=layers, max_position_embeddings=4096, **SHAPES[shape])
    model = LlamaForCausalLM(cfg).eval()
    return LoadedModel(model=model, tokenizer=None, source=f"random-{shape}-{layers}L", path=None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--methods",
        default="sparsegpt-50,wanda-50,gptq-w4g128,awq-w4g128,sparsegpt-50+w4g128",
        help=f"comma-separated: {', '.join(METHODS)}",
    )
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2

    import torch

    from recoup.compress import CompressConfig, compress
    from recoup.data.calibration import Calibration
    from recoup.errors import RecoupError

    rows = []
    for name in args.methods.split(","):
        loaded = build(args.shape, args.layers, args.seed)
        ids = torch.randint(0, 1000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(args.seed))
        calib = Calibration(input_ids=ids, corpus="random", split="train", seqlen=args.seqlen, seed=args.seed)
        cfg = CompressConfig(**METHODS[name], batch_size=args.batch_size)
        try:
            t0 = time.time()
            rep = compress(loaded, cfg, calib, device=args.device)
            total = time.time() - t0
        except RecoupError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        layer_s = [sum(r.seconds for r in rep.linears if r.layer == i) for i in range(args.layers)]
        cuda = torch.cuda.is_available() and args.device != "cpu"
        row = {
            "method": name,
            "shape": args.shape,
            "layers": args.layers,
            "total_s": round(total, 2),
            "method_s_per_layer": round(sum(layer_s) / len(layer_s), 2),
            "wall_s_per_layer": round(total / args.layers, 2),
            "peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            "mean_error": rep.mean_error,
            "sparsity": rep.sparsity,
        }
        rows.append(row)
        print(
            f"{name:22s} {args.shape} x{args.layers}: {total:7.1f}s total, {row['wall_s_per_layer']:6.1f}s/layer wall "
            f"({row['method_s_per_layer']:.1f}s in the method), peak {row['peak_device_mib']} MiB",
            flush=True,
        )
        del loaded, rep
        if cuda:
            torch.cuda.empty_cache()
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    print(
        f"\n| method | s/layer (wall) | s/layer (method) | peak device MiB |  ({env['device']}, "
        f"{args.nsamples}x{args.seqlen} calibration)\n|---|---:|---:|---:|"
    )
    for r in rows:
        print(f"| {r['method']} | {r['wall_s_per_layer']} | {r['method_s_per_layer']} | {r['peak_device_mib']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
