"""AWQ w3 g64 variants at calibration 32 x 512 PTB-train seed 0, PTB-test 8 x 2048 (issue 13's AWQ settings).

    python awq_variants.py VARIANT BLOCK_TOKENS [RECIPE_JSON]
VARIANT: seq (the engine as it is) | dense (every group's statistics from the unquantized layer) | fp (dense, and
the next layer's inputs from the unquantized layer: llm-awq's run_awq); the last two patch the engine here.
BLOCK_TOKENS: 0 for the method's default. RECIPE_JSON overrides keys, e.g. '{"sym": false}' or '{"method": "gptq"}'."""
import json, sys, time, torch
from recoup.artifact import load_model
from recoup.compress import CompressConfig, compress
import recoup.compress.engine as E
from recoup.data.calibration import calibration_windows
from recoup.evaluate.perplexity import perplexity
variant, block_tokens = sys.argv[1], int(sys.argv[2])
recipe = {"method": "awq", "bits": 3, "group_size": 64, "batch_size": 8}
if block_tokens > 0:  # 0: the method's default (and a method without the key, e.g. '{"method": "gptq"}')
    recipe["block_tokens"] = block_tokens
if len(sys.argv) > 3:
    recipe = {**recipe, **json.loads(sys.argv[3])}
if variant == "fp":  # llm-awq / AutoAWQ: the next layer's inputs are the unquantized layer's outputs
    orig_layer, orig_prop = E._compress_layer, E._propagate
    saved = {}
    def layer(i, layer, anat, method, groups, config, inps, rec, *a, **k):
        if inps is not None:
            out = inps.clone(); orig_prop(layer, out, rec, config.batch_size); saved["out"] = out
        return orig_layer(i, layer, anat, method, groups, config, inps, rec, *a, **k)
    def prop(layer, inps, rec, bs):
        inps.copy_(saved.pop("out"))
    E._compress_layer, E._propagate = layer, prop
loaded = load_model("smollm2-135m")
config = CompressConfig.from_dict(recipe)
if variant in ("dense", "fp"):  # every group's statistics from one forward of the unquantized layer (llm-awq, AutoAWQ)
    config.options.true_sequential = False
cal = calibration_windows(loaded.tokenizer, "ptb", 32, 512, 0)
t = time.time(); compress(loaded, config, cal); dt = time.time() - t
res = perplexity(loaded.model, loaded.tokenizer, "ptb", "test", seqlen=2048, limit=8)
print("RESULT", json.dumps({"variant": variant, "recipe": recipe, "compress_s": dt, "ppl": res.ppl}), flush=True)
