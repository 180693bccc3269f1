"""CLI flags generated from a stage's job keys (:func:`recoup.recipe.jobs.keys`): one flag per key, named
``--key-with-dashes``, so every option of ``recoup compress|eval|recover`` is a recipe key and the reverse.

A flag left out is ``None`` and the job's (or method's) default applies; a boolean key gets ``--x/--no-x``;
a list key takes a comma-separated value; a mapping key takes ``KEY=VALUE`` and repeats.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from recoup.errors import RecoupError
from recoup.recipe.jobs import JOBS, Key, base_type, keys

# Presentation only: help lines for the keys (the keys and their checks live with the jobs and configs).
HELP: dict[str, str] = {
    "out": "directory to write (must be absent or empty, unless --force)",
    "force": "allow a non-empty --out",
    "calib": "calibration corpus: ptb, wiki, or a .txt/.jsonl file",
    "true_sequential": "statistics of each group from the layer with the earlier groups compressed (on) or from the "
    "dense layer (off: the SparseGPT/Wanda reference order); sparsegpt default: on when it quantizes; "
    "awq: on with --rounding rtn, off with gptq",
    "nsamples": "calibration windows",
    "seqlen": "compress: calibration window length; eval: perplexity window; recover: training window / max "
    "tokens per example",
    "seed": "seed of calibration offsets / sampled task subsets / initialisation, batch order and task split",
    "dtype": "auto (default: the checkpoint's dtype on CUDA, float32 on CPU) | float32 | bfloat16 | float16",
    "device_map": "auto: spread a model too large for one device over the GPUs, then CPU memory (accelerate)",
    "gradient_checkpointing": "recompute decoder layers in the backward: much less activation memory, ~30% slower",
    "device": "cpu | cuda | cuda:N (compress: also auto; on a GPU the model stays on CPU, one decoder layer at a "
    "time moves to it)",
    "lazy": "compress: read each decoder layer's weights from the checkpoint when it is reached, write and free it "
    "(memory: one layer, not the model; the same artifact); recover --method eora on CPU: read the artifact and its "
    "dense source one layer at a time (the same recovery); --no-lazy loads the whole model first",
    "storage": "packed: bit-packed codes + sparsity bitmasks (loads to the same weights, bit for bit); dense: "
    "fake-quant weights",
    "method": "the method (see the list above)",
    "sparsity": "fraction of weights to prune (0-0.99)",
    "pattern": "N:M semi-structured sparsity, N kept of every M (e.g. 2:4)",
    "bits": "quantization bits (2-8); with sparsegpt: the joint sparse + quantized pass",
    "group_size": "columns per quantization group (-1: one group per row)",
    "sym": "symmetric grid (--no-sym: asymmetric min/max)",
    "scale_dtype": "float32 | float16: float16 rounds grid scales to fp16, so `recoup export --format gguf` writes "
    "Q4_0/Q4_1/Q8_0 exactly (e.g. GPTQ quality in a Q4_0 file)",
    "scale_search": "minmax | mse: each quantization group's range as is (min/max), or shrunk to the range of least "
    "error (GPTQ's mse quantizer, llm-compressor's MSE observer)",
    "targets": "which linears: all, attention, mlp",
    "batch_size": "compress: calibration windows per forward; eval: scoring batch; recover: windows or examples "
    "per step",
    "activation_budget_mb": "compress: MiB the calibration activations may take in memory: within it one forward "
    "per layer (parked at each group), over it re-runs per group, and activations larger than it go to a "
    "memory-mapped file in TMPDIR, batch by batch (the same artifact); default: in memory, parked forwards up to "
    "half the free memory",
    "activation_dtype": "compress: auto (the layers' dtype: float32 on CPU) | float32 | bfloat16 | float16: the "
    "calibration activations stored between layers; bfloat16 halves them, rounding each layer's inputs (the "
    "layers still compute in their own dtype)",
    "tasks": "comma-separated tasks, e.g. ppl:ptb,arc_easy,piqa (default ppl:ptb)",
    "suite": "a named task suite: kick (LLM-KICK's families) or zeroshot",
    "limit": "at most N perplexity windows / N examples per task",
    "limits": "per-task limit, TASK=N (repeatable)",
    "options": "task option KEY=VALUE (repeatable): shots, context_tokens, max_new_tokens, cnndm_file, "
    "instructions_file, instructions_reference, chat, factoid_template",
    "judge_url": "OpenAI-compatible endpoint of the LLM judge (e.g. http://host/v1)",
    "judge_model": "model name sent to the judge endpoint",
    "judge_key_env": "environment variable holding the judge's API key (named: must be set and non-empty; the "
    "default OPENAI_API_KEY may be unset for a keyless endpoint); never logged or written",
    "judge_local": "a local model source to use as the judge instead of a URL",
    "judge_retries": "attempts per judged example",
    "judge_timeout": "seconds to wait for one judge reply (default 120; a judge served on a CPU may need more)",
    "judge_max_tokens": "the judge's reply length cap in tokens (default 512)",
    "recovery": "directory of a saved recovery (prompt or adapter) to attach",
    "prompt_text": "a hard prompt: text prepended (as token embeddings, never scored) to every input",
    "json": "write results JSON here",
    "bos": "BOS policy: auto (one BOS first in every window/request if the tokenizer adds one), always, never",
    "data": "training text: ptb, wiki, a .txt/.jsonl file, or a comma-separated mix (not with --task)",
    "task": "train on a multiple-choice task's train part (e.g. sciq): loss on the gold continuation; the "
    "held-out part is never seen",
    "heldout_fraction": "held-out share of --task, split by a seeded hash of each example (default 0.3)",
    "steps": "optimizer steps",
    "lr": "peak learning rate (AdamW, linear warm-up and decay)",
    "time_budget": "stop after this many seconds (best state kept)",
    "eval_every": "validate every N steps (best state kept)",
    "val_windows": "corpus valid-split windows scored at each validation",
    "tokens": "prompt length in virtual tokens",
    "init": "where training starts: prompts vocab | text | random; lora, cpet zero (PEFT's init) | eora (EoRA's "
    "compensation at --rank, computed first on --calib, --nsamples windows of 512)",
    "init_text": "text whose token embeddings initialise the prompt (with --init text)",
    "pool": "prompts in the IDP pool",
    "select_layers": "score the IDP pool on the first K decoder layers only",
    "selection": "IDP: one-prefill (the choice made inside the prefill) or two-pass (an extra selection prefill)",
    "text": "the hard prompt's text",
    "rank": "LoRA rank (EoRA with --energy: the largest per-layer rank)",
    "alpha": "LoRA alpha",
    "energy": "EoRA per-layer rank: the smallest keeping this share (0, 1] of each layer's projected error energy",
    "inherit": "start from this saved LoRA or EoRA (same targets, --rank its largest rank; per-layer ranks are "
    "kept); CPET: the dense model's LoRA (also the teacher's)",
    "teacher": "dense model source for CPET distillation (default: the artifact's source model)",
    "trainable": "tune: comma list of scales (quantized linears' group scales, codes frozen), weights (sparse "
    "unquantized linears' kept weights, mask frozen), norms (normalisation gains)",
    "blockwise_steps": "tune: before end to end, fit each decoder layer's trainable parts for N steps to the dense "
    "layer's output, one layer at a time, on the compression's calibration windows (0: off)",
    "objective": "lm | kd (teacher's next-token distribution) | squarehead (teacher's decoder-layer outputs, "
    "normalised MSE) | a + sum: lm+kd, kd+squarehead, lm+squarehead, lm+kd+squarehead",
    "squarehead_weight": "weight of the squarehead term beside another term",
}
ALIASES: dict[str, tuple[str, ...]] = {"options": ("--option",), "alpha": ("--lora-alpha",)}


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (got '{text}')")
    return key, value


def _describe(key: Key, helps: dict[str, str] = HELP) -> str:
    parts = [helps.get(key.name, key.name.replace("_", " "))]
    if key.default not in (None, [], {}, "") and not isinstance(key.default, bool):
        parts.append(f"default {key.default}")
    if key.methods:
        parts.append("methods: " + ", ".join(key.methods))
    return "; ".join(parts).replace("%", "%%")  # argparse %-formats help text ("~30% slower" broke --help)


def add_job_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    """One flag per key of the stage ``kind``; the job's positional keys (the model) become positionals."""
    positional = JOBS[kind].POSITIONAL
    own = getattr(JOBS[kind], "FLAG_HELP", {})  # a job's own help lines (export's) win over the shared ones
    for key in keys(kind):
        if key.name in positional:
            p.add_argument(
                key.name,
                help=own.get(
                    key.name, "model source (smollm2-135m, a .gguf, a local HF dir, a recoup artifact, a hub id)"
                ),
            )
            continue
        tp = base_type(key.type)
        kwargs: dict[str, Any] = {"dest": key.name, "default": None, "help": _describe(key, {**HELP, **own})}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp is dict or typing.get_origin(tp) is dict:
            kwargs.update(action="append", type=_kv, metavar="KEY=VALUE")
        elif tp is int or tp is float:
            kwargs.update(type=tp, metavar=key.name.upper())
        else:
            kwargs["metavar"] = key.name.upper()
        p.add_argument(key.flag, *ALIASES.get(key.name, ()), **kwargs)


def given(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The keys the user gave (flags left out are not passed: the defaults apply)."""
    out: dict[str, Any] = {}
    for key in keys(kind):
        value = getattr(args, key.name, None)
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            value = dict(value)
            if key.name == "limits":
                try:
                    value = {k: int(v) for k, v in value.items()}
                except ValueError:
                    raise RecoupError(f"--limits wants TASK=N with N a whole number (got {value})") from None
        out[key.name] = value
    return out


def job_from_args(args: argparse.Namespace, kind: str):
    """The stage's typed job from the parsed flags (validated: bad input is one line before any work)."""
    return JOBS[kind].from_flat(given(args, kind))
