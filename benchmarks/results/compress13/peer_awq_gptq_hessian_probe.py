"""Which inputs llm-compressor 0.14's GPTQModifier, run after AWQModifier, takes its Hessian from (session 14's puzzle).

Runs in the peer's venv on the bundled model, AWQ + GPTQ w3 g64 sym, 4 random windows of 64 tokens. Logs the order
of the events (AWQ's smoothing of layer 0, GPTQ's Hessian hook on layer 0's q_proj, GPTQ's compress calls), then
compares the Hessian GPTQ compressed q_proj with against X^T X of the inputs q_proj read in GPTQ's hook and against
X^T X of those inputs with the smoothing undone (X * s). Prints a JSON line.

    /work/wt/venvs/llmc/bin/python peer_awq_gptq_hessian_probe.py
"""
import json
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.transform import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer
IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
d = "/root/.cache/recoup/models/smollm2-135m"
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32); tok = AutoTokenizer.from_pretrained(d)
q0 = model.model.layers[0].self_attn.q_proj; ln0 = model.model.layers[0].input_layernorm
log, X, rec = [], [], {}
orig_cal = GPTQModifier.calibrate_module
def cal(self, module, args, out):
    if module is q0: X.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone()); log.append("gptq-hook q0")
    return orig_cal(self, module, args, out)
GPTQModifier.calibrate_module = cal
orig_sm = AWQModifier._apply_smoothing
def sm(self, m):
    before = ln0.weight.detach().clone(); orig_sm(self, m); after = ln0.weight.detach().clone()
    if not torch.equal(before, after) and "s" not in rec: rec["s"] = before / after; log.append("smooth layer0")
GPTQModifier.compress_module_list = (lambda f: (lambda self, mods: (rec.setdefault("H", self._hessians[q0].clone()) if q0 in mods else None, log.append(f"compress {len(mods)}"), f(self, mods))[-1]))(GPTQModifier.compress_module_list)
torch.manual_seed(0)
ids = torch.randint(100, 40000, (4, 64))
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
AWQModifier._apply_smoothing = sm
g = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}
oneshot(model=model, tokenizer=tok, dataset=ds, recipe=[AWQModifier(), GPTQModifier(config_groups=g, ignore=["lm_head"])],
        num_calibration_samples=4, max_seq_length=64, shuffle_calibration_samples=False, batch_size=1)
x = torch.cat(X).double(); s = rec["s"].double(); H = rec["H"].double()
def rel(a, b): return float((a / a.norm() - b / b.norm()).norm())
read = x.T @ x; xu = x * s; unsmoothed = xu.T @ xu
print(json.dumps({"events": log[:7], "s_min": float(s.min()), "s_max": float(s.max()),
                  "rel_diff_H_vs_inputs_read": rel(H, read), "rel_diff_H_vs_inputs_unsmoothed": rel(H, unsmoothed)}))
