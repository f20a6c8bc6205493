"""Check an edgetune GGUF LoRA adapter in llama.cpp itself.

Loads the base model with the adapter in llama.cpp (PyPI's llama-cpp-python)
and compares with edgetune on the same text and prompt:

- perplexity of TEXT (windows of 512 tokens, logits at every position),
  base and adapted, from llama.cpp's logits and from `edgetune score --json`;
- greedy continuations of PROMPT, compared up to the first near-tie
  (llama.cpp rounds activations to 8 bits, so later tokens may drift).

    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python
    python scripts/llamacpp_lora_check.py MODEL.gguf ADAPTER.gguf TEXT [--edgetune target/release/edgetune] [--merged MERGED.gguf]

With `--merged` (a model `edgetune merge MODEL ADAPTER` wrote), llama.cpp
also loads the merged model alone; its perplexity is compared with
`edgetune score` on the merged model and with base + adapter.

Prints a JSON report and exits non-zero when llama.cpp's adapted perplexity
differs from edgetune's by more than 2%, or when the adapter's effect (the
change in perplexity) differs by more than 10% of itself.
"""
import argparse
import json
import math
import subprocess
import sys

import numpy as np
from llama_cpp import Llama

PROMPT = "The capital of France is"


def llama(model, adapter, n_ctx):
    kw = dict(model_path=model, n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, seed=0)
    if adapter:
        kw["lora_path"] = adapter
    return Llama(**kw)


def llama_ppl(llm, text, context):
    """Perplexity as `edgetune score --context N` defines it: windows of N
    tokens (no BOS for SmolLM2), each evaluated alone."""
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    total, count = 0.0, 0
    for w0 in range(0, len(ids), context):
        win = ids[w0 : w0 + context]
        if len(win) < 2:
            continue
        llm.reset()
        llm.eval(win)
        logits = np.array(llm.scores[: len(win)], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))[:-1]
        total += float((lse - logits[np.arange(len(win) - 1), win[1:]]).sum())
        count += len(win) - 1
    return len(ids), math.exp(total / count)


def llama_greedy(llm, n):
    out = llm.create_completion(PROMPT, max_tokens=n, temperature=0.0, top_k=1)
    return out["choices"][0]["text"]


def edgetune(exe, args):
    o = subprocess.run([exe, *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(o.stdout.strip().splitlines()[-1])


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("adapter")
    ap.add_argument("text")
    ap.add_argument("--edgetune", default="target/release/edgetune")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--merged")
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    context = 512
    report = {}
    runs = [("base", a.model, None), ("adapted", a.model, a.adapter)]
    if a.merged:
        runs.append(("merged", a.merged, None))
    for name, model, adapter in runs:
        llm = llama(model, adapter, context)
        n, ppl = llama_ppl(llm, text, context)
        extra = ["--adapter", adapter] if adapter else []
        et = edgetune(a.edgetune, ["score", model, a.text, "--context", str(context), "--device", "cpu", *extra])
        g_llama = llama_greedy(llm, a.tokens)
        g_et = edgetune(a.edgetune, ["generate", model, "-p", PROMPT, "--max-tokens", str(a.tokens), "--device", "cpu", *extra])["text"]
        report[name] = {
            "tokens": n,
            "perplexity_llama_cpp": ppl,
            "perplexity_edgetune": et["perplexity"],
            "relative_difference": abs(ppl - et["perplexity"]) / et["perplexity"],
            "greedy_llama_cpp": g_llama,
            "greedy_edgetune": g_et,
            "greedy_common_chars": common_prefix(g_llama, g_et),
        }
        del llm
    eff_llama = report["adapted"]["perplexity_llama_cpp"] / report["base"]["perplexity_llama_cpp"]
    eff_et = report["adapted"]["perplexity_edgetune"] / report["base"]["perplexity_edgetune"]
    report["adapter_effect"] = {"llama_cpp": eff_llama, "edgetune": eff_et}
    if a.merged:
        m = report["merged"]
        # The merged model in llama.cpp against base + adapter in edgetune.
        m["relative_difference_to_adapted_edgetune"] = (
            abs(m["perplexity_llama_cpp"] - report["adapted"]["perplexity_edgetune"]) / report["adapted"]["perplexity_edgetune"]
        )
    print(json.dumps(report, indent=1))
    ok = report["adapted"]["relative_difference"] < 0.02 and abs(math.log(eff_llama) - math.log(eff_et)) < 0.1 * abs(math.log(eff_et))
    if a.merged:
        ok = ok and report["merged"]["relative_difference"] < 0.02
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
