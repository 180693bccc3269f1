"""Which inputs llm-compressor 0.14's GPTQModifier, run after AWQModifier, takes its Hessian from (session 14's puzzle).

Runs in the peer's venv on the bundled model (or MODEL_DIR), AWQ + GPTQ w3 g64 sym, 4 random windows of 64 tokens.
Logs the order of the events (every AWQ smoothing call, GPTQ's Hessian hook on layer 0's q_proj, GPTQ's compress
calls), then compares the Hessian GPTQ compressed layer 0's q_proj with against X^T X of the inputs q_proj read in
GPTQ's hook and against X^T X of those inputs with layer 0's smoothing undone (X * s). Prints a JSON line.

    /work/wt/venvs/llmc/bin/python peer_awq_gptq_hessian_probe.py [MODEL_DIR]
"""
import json
import sys

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.transform import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer

IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None  # no accelerator here
model_dir = sys.argv[1] if len(sys.argv) > 1 else "/root/.cache/recoup/models/smollm2-135m"
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
q0, ln0 = model.model.layers[0].self_attn.q_proj, model.model.layers[0].input_layernorm
events, inputs, seen = [], [], {}

calibrate, smooth, compress_list = GPTQModifier.calibrate_module, AWQModifier._apply_smoothing, GPTQModifier.compress_module_list


def calibrate_spy(self, module, args, out):
    if module is q0:
        inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        events.append("gptq hessian hook, layer 0 q_proj")
    return calibrate(self, module, args, out)


def smooth_spy(self, m):
    before = ln0.weight.detach().clone()
    smooth(self, m)
    changed = not torch.equal(before, ln0.weight)
    events.append("awq smoothing" + (" (layer 0's norm changed)" if changed else ""))
    if changed:
        seen["s"] = before / ln0.weight.detach()  # the norm's output, q_proj's input, is divided by s


def compress_spy(self, modules):
    if q0 in modules:
        seen["H"] = self._hessians[q0].clone()
    events.append(f"gptq compress {len(modules)} linears")
    return compress_list(self, modules)


GPTQModifier.calibrate_module, AWQModifier._apply_smoothing = calibrate_spy, smooth_spy
GPTQModifier.compress_module_list = compress_spy
torch.manual_seed(0)
ids = torch.randint(100, 40000, (4, 64))
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
grid = {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
oneshot(model=model, tokenizer=tok, dataset=ds,
        recipe=[AWQModifier(), GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": grid}},
                                            ignore=["lm_head"])],
        num_calibration_samples=4, max_seq_length=64, shuffle_calibration_samples=False, batch_size=1)

x, s, h = torch.cat(inputs).double(), seen["s"].double(), seen["H"].double()


def rel(a, b):
    return float((a / a.norm() - b / b.norm()).norm())


first_hook = next(i for i, e in enumerate(events) if e.startswith("gptq hessian"))
print(json.dumps({
    "awq_smoothing_calls": sum(e.startswith("awq smoothing") for e in events),
    "awq_smoothing_calls_after_first_gptq_hook": sum(e.startswith("awq smoothing") for e in events[first_hook:]),
    "first_events": events[:3], "events_from_first_gptq_hook": events[first_hook:first_hook + 6],
    "s_min": float(s.min()), "s_max": float(s.max()),
    "rel_diff_H_vs_inputs_read": rel(h, x.T @ x), "rel_diff_H_vs_inputs_unsmoothed": rel(h, (x * s).T @ (x * s))}))
