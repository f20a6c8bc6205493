"""Check edgetune's PEFT export of the non-LoRA methods in PyPI's `peft`.

For each ADAPTER (an edgetune adapter file, as `train` writes it), runs
`edgetune export ADAPTER --format peft` into a temporary directory, loads
that directory with `PeftModel.from_pretrained` on the GGUF model as
transformers reads it (dequantized to f32), and compares the perplexity of
TEXT (windows of 512 tokens, as tests/reference/README.md defines it) with
`edgetune score --adapter ADAPTER` — base and adapted, so that the adapter's
own effect is compared, not only the totals.

    venv/bin/pip install torch transformers peft gguf
    venv/bin/python scripts/peft_export_check.py MODEL.gguf TEXT ADAPTER.gguf... [--edgetune target/release/edgetune]

Prints one JSON line per adapter; exits non-zero when an adapted perplexity
differs by more than 0.5%, or an adapter's effect (the change in NLL) by
more than 5% of itself.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(gguf):
    d, f = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return tok, model.eval()


def nll(model, ids, window=512, virtual=0):
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        w = ids[start : start + window]
        if len(w) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([w])).logits[0]
        # Prompt tuning returns the virtual tokens' rows first.
        logits = logits[logits.shape[0] - len(w) :]
        lp = torch.log_softmax(logits[:-1].double(), -1)
        tgt = torch.tensor(w[1:])
        total -= lp[torch.arange(len(tgt)), tgt].sum().item()
        count += len(tgt)
    return total / count


def edgetune_nll(exe, model, text, adapter):
    cmd = [exe, "score", model, text, "--json", "--threads", "2"]
    if adapter:
        cmd += ["--adapter", adapter]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["nll"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("adapters", nargs="+")
    ap.add_argument("--edgetune", default="target/release/edgetune")
    a = ap.parse_args()
    tok, base = load(a.model)
    ids = tok(open(a.text).read(), add_special_tokens=False).input_ids
    base_peft = nll(base, ids)
    base_ours = edgetune_nll(a.edgetune, a.model, a.text, None)
    ok = True
    for adapter in a.adapters:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "peft")
            subprocess.run(
                [a.edgetune, "export", adapter, "--format", "peft", "--out", out, "--model", a.model],
                check=True,
                capture_output=True,
            )
            _, fresh = load(a.model)
            adapted = PeftModel.from_pretrained(fresh, out).eval()
            peft_nll = nll(adapted, ids)
            cfg = json.load(open(os.path.join(out, "adapter_config.json")))
        ours = edgetune_nll(a.edgetune, a.model, a.text, adapter)
        effect_peft, effect_ours = peft_nll - base_peft, ours - base_ours
        rel = abs(math.exp(peft_nll) - math.exp(ours)) / math.exp(ours)
        eff = abs(effect_peft - effect_ours) / max(abs(effect_ours), 1e-9)
        good = rel < 0.005 and eff < 0.05
        ok &= good
        print(json.dumps({
            "adapter": adapter,
            "peft_type": cfg["peft_type"],
            "use_dora": cfg.get("use_dora", False),
            "perplexity_peft": math.exp(peft_nll),
            "perplexity_edgetune": math.exp(ours),
            "base_perplexity_peft": math.exp(base_peft),
            "base_perplexity_edgetune": math.exp(base_ours),
            "effect_nll_peft": effect_peft,
            "effect_nll_edgetune": effect_ours,
            "ok": good,
        }))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
