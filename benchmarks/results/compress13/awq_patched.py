"""AWQ w3 g64 at calibration 32 x 512 PTB-train seed 0, PTB-test 8 x 2048 (issue 13's AWQ settings), with recipe keys
and patches of the method module (session 13):

    python awq_patched.py NAME [RECIPE_JSON [PATCH_JSON]]
RECIPE_JSON overrides recipe keys, e.g. '{"clip_tokens": 4096}' or '{"rounding": "gptq"}'. PATCH_JSON: {"no_clip": []}
clips q and k too (llm-awq skips them); {"clip_grid": N, "max_shrink": F} another clipping grid; {"both": true}
llm-compressor's duo_scaling="both" (the plain and the duo exponents, 2 x grid candidates); {"seed": N} another
calibration seed; {"gptq_h": "unscaled"} (with rounding gptq) GPTQ on the Hessian of the unscaled inputs X^T X, as
session 14 read llm-compressor's AWQModifier + GPTQModifier to do (wrong: session 15's
peer_awq_gptq_hessian_probe.py shows its GPTQ Hessians are of the smoothed inputs), in place of the rescaled inputs' H / (s s^T); {"dense": true} every group's statistics from the dense layer (the
method option true_sequential off, as awq_variants.py's dense; since session 14 the same as the recipe key
'{"true_sequential": false}', kept so the recorded commands rerun as written)."""
import json, sys, time, functools, torch
from recoup.artifact import load_model
from recoup.compress import CompressConfig, compress
import recoup.compress.methods.awq as A
from recoup.data.calibration import calibration_windows
from recoup.evaluate.perplexity import perplexity
name = sys.argv[1]
recipe = {"method": "awq", "bits": 3, "group_size": 64, "batch_size": 8, **json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")}
patch = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
if "no_clip" in patch:
    A.NO_CLIP = tuple(patch["no_clip"])
if "clip_grid" in patch:
    A.awq_clip = functools.partial(A.awq_clip, n_grid=patch["clip_grid"], max_shrink=patch.get("max_shrink", 0.5))
if patch.get("both"):  # llm-compressor's duo_scaling="both" at n_grid 2*grid: grid plain + grid duo exponents in [0, 1]
    orig = A.scale_candidates
    def both(x_mean, w_mean, n_grid):
        plain = orig(x_mean, None, n_grid)
        if w_mean is None:
            return plain
        out = []
        for a, _ in plain:
            s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            out.append((a, torch.where(torch.isfinite(s), s, torch.ones_like(s))))
        return plain + out
    A.scale_candidates = both
if patch.get("gptq_h") == "unscaled":
    orig_compress = A.METHOD.compress_linear
    class _Unscaled:  # the stats as _compress reads them, without the input scale
        def __init__(self, st):
            self.hessian = st.hessian
    object.__setattr__(A.METHOD, "compress_linear", lambda w, st, c: orig_compress(w, _Unscaled(st), c))
loaded = load_model("smollm2-135m")
config = CompressConfig.from_dict(recipe)
if patch.get("dense"):
    config.options.true_sequential = False
cal = calibration_windows(loaded.tokenizer, "ptb", 32, 512, patch.get("seed", 0))
t = time.time(); compress(loaded, config, cal); dt = time.time() - t
res = perplexity(loaded.model, loaded.tokenizer, "ptb", "test", seqlen=2048, limit=8)
print("RESULT", json.dumps({"name": name, "recipe": recipe, "patch": patch, "compress_s": dt, "ppl": res.ppl}), flush=True)
