"""llm-compressor's side of benchmarks/compress_vs_peer.py; runs in the peer's own virtual environment.

Never imports recoup. Loads the HF model directory, calibrates on the exact token windows recoup used
(a saved (N, T) tensor, no shuffling), runs ``llmcompressor.oneshot`` with the recipe of the same name,
times it, and saves the model's state dict with every quantized linear's weight dequantized on its
grid (compressed-tensors' own ``forward_quantize``), so recoup scores the result with its own evaluator.
With ``--no-save`` (benchmarks/memory.py's peer cells) nothing is written: the process is measured for its
peak memory and time only (an 8B model's float32 state dict would be 30 GB). The model is loaded whole, in
float32 (recoup's compute dtype on CPU), with ``AutoModelForCausalLM.from_pretrained``. Prints one
``RESULT {json}`` line.

    VENV/bin/python benchmarks/compress_peer_worker.py --model-dir DIR --calib ids.pt --recipe gptq-w4g64 --out W.pt
    VENV/bin/python benchmarks/compress_peer_worker.py --model-dir DIR --calib ids.pt --recipe rtn-w4g128 --no-save
"""

from __future__ import annotations

import argparse
import json
import time


def weights_args(bits: int, group_size: int, sym: bool, observer: str | None = None) -> dict:
    args = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group_size}
    return {**args, "observer": observer} if observer else args


def recipe(name: str, sym: bool):
    """The llm-compressor modifiers (at their defaults) for a recipe name of compress_vs_peer.RECIPES."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    def groups(bits: int, gs: int, observer: str | None = None) -> dict:
        return {"group_0": {"targets": ["Linear"], "weights": weights_args(bits, gs, sym, observer)}}

    ignore = ["lm_head"]
    # The pruning modifiers match the ignore list against "<target>.<name>" ("lm_head." for the head itself),
    # so a plain "lm_head" does not exclude it: llm-compressor 0.14 then prunes lm_head ("Sparsifying lm_head")
    # and, on a model with tied embeddings, the input embedding with it. Its own warning's advice:
    prune_ignore = ["lm_head", "re:.*lm_head"]
    if name == "rtn-w4g128":  # round-to-nearest onto the group's min/max grid: no calibration statistics
        return [QuantizationModifier(config_groups=groups(4, 128), ignore=ignore)]
    if name == "gptq-w4g64":
        return [GPTQModifier(config_groups=groups(4, 64), ignore=ignore)]
    if name == "gptq-w3g64":
        return [GPTQModifier(config_groups=groups(3, 64), ignore=ignore)]
    if name in ("gptq-w4g64-mse", "gptq-w3g64-mse"):  # the weight observer searching the range by MSE
        return [GPTQModifier(config_groups=groups(4 if "w4" in name else 3, 64, "memoryless_mse"), ignore=ignore)]
    if name == "sparsegpt-50":
        return [SparseGPTModifier(sparsity=0.5, mask_structure="0:0", ignore=prune_ignore)]
    if name == "sparsegpt-2:4":
        return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=prune_ignore)]
    if name == "wanda-50":
        return [WandaPruningModifier(sparsity=0.5, mask_structure="0:0", ignore=prune_ignore)]
    if name in ("awq-w4g64", "awq-w3g64"):
        bits = 4 if name == "awq-w4g64" else 3
        return [AWQModifier(), QuantizationModifier(config_groups=groups(bits, 64), ignore=ignore)]
    if name == "awq-gptq-w3g64":  # AWQ's smoothing, then GPTQ quantizes (recoup: awq rounding=gptq)
        return [AWQModifier(), GPTQModifier(config_groups=groups(3, 64), ignore=ignore)]
    if name == "sparsegpt-50+w4g64":  # llm-compressor's sparse-then-quantize recipe
        return [
            SparseGPTModifier(sparsity=0.5, mask_structure="0:0", ignore=prune_ignore),
            GPTQModifier(config_groups=groups(4, 64), ignore=ignore),
        ]
    raise SystemExit(f"unknown recipe {name}")


def dequantized_state(model) -> dict:
    """The model's state dict with each quantized linear's weight replaced by its fake-quantized value."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    quantized = 0
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if isinstance(mod, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            with torch.no_grad():
                state[f"{name}.weight"] = forward_quantize(mod, mod.weight, "weight", scheme.weights).detach().clone()
            quantized += 1
    return state, quantized


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--calib", required=True, help="torch-saved (N, T) int64 token windows")
    p.add_argument("--recipe", required=True)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", help="where the dequantized state dict goes (torch.save)")
    p.add_argument("--no-save", action="store_true", help="write nothing (memory and time measurements)")
    args = p.parse_args()
    if not args.out and not args.no_save:
        p.error("give --out W.pt or --no-save")

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # llm-compressor 0.14.0.1's AWQ pins its cached activations unconditionally (for faster host-to-device
        # copies), which raises "Cannot access accelerator device" on a CPU-only machine. Pinning changes no
        # value; without an accelerator it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    ids = torch.load(args.calib)
    n, t = ids.shape
    t_load = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    load_s, model_dtype = time.time() - t_load, str(next(model.parameters()).dtype).replace("torch.", "")
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0, c0 = time.time(), time.process_time()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe(args.recipe, not args.asym),
        num_calibration_samples=n,
        max_seq_length=t,
        shuffle_calibration_samples=False,
        batch_size=args.batch_size,
    )
    seconds, cpu = time.time() - t0, time.process_time() - c0
    if args.no_save:
        quantized = sum(
            1
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and getattr(getattr(m, "quantization_scheme", None), "weights", None)
        )
    else:
        state, quantized = dequantized_state(model)
        torch.save(state, args.out)
    import llmcompressor

    print(
        "RESULT "
        + json.dumps(
            {
                "compress_s": seconds,
                "compress_cpu_s": cpu,
                "quantized_linears": quantized,
                "llmcompressor": llmcompressor.__version__,
                "torch": torch.__version__,
                "model_dtype": model_dtype,
                "load_s": load_s,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
