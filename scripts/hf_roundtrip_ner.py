#!/usr/bin/env python3
"""Check that a bertrt token-classification model directory loads in Hugging
Face transformers as BertForTokenClassification and gives bertrt's logits.

Usage: scripts/hf_roundtrip_ner.py MODEL_DIR [TEXTS_FILE]

  MODEL_DIR   a `bertrt finetune --task token-classification` output
  TEXTS_FILE  texts, one per line (default: a built-in list: empty,
              unicode, punctuation, a text longer than max_length, ...)

For each text, `$BERTRT predict --model MODEL_DIR --words --jsonl` gives the
words (split as the model's tokenizer pre-tokenizes the text: whitespace and
punctuation for BERT) with the logits bertrt reads at each word's first
subword (BERTRT defaults to target/release/bertrt). The same words go through
AutoTokenizer(is_split_into_words=True) and BertForTokenClassification (a
LoRA adapter directory, `finetune --lora-rank` without --merge-lora:
AutoModelForTokenClassification on the base + peft.PeftModel.from_pretrained,
as in hf_roundtrip.py), one text at a time (no padding); the logits at each
word's first subword (`word_ids()`) are compared with bertrt's, and so are the
argmax tags and which words were cut off by max_length. Fails (exit 1) when
loading reports missing/unexpected/mismatched weights (adapters: also PEFT
warnings and adapter/head tensors not loaded exactly), when a max abs logit
difference exceeds TOL (env HF_ROUNDTRIP_TOL, default 1e-4), or when tags or
truncation differ. Needs bench/.venv (bench/setup-venv.sh).
"""

import json
import os
import subprocess
import sys

from hf_roundtrip import is_adapter_dir, load_model

DEFAULT_TEXTS = [
    "",
    "Barack Obama visited the Empire State Building in New York .",
    "@paulwalk It 's the view from where I 'm living for two weeks .",
    "Héllo wörld ! Ça va ? Naïve café , Straße , ÅNGSTRÖM",
    "你好，世界。 これは 日本語 です",
    "great product 🙂👍🏽 would buy again !!! :-)",
    "   leading and trailing   whitespace\tand\ttabs   ",
    "don't won't can't 3.14 $100 #hashtag http://example.com/a?b=c",
    " ".join(["Apple and Google opened offices in London and Paris ."] * 30),
]

TOL = float(os.environ.get("HF_ROUNDTRIP_TOL", "1e-4"))


def fail(msg):
    print(f"hf_roundtrip_ner: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def bertrt_words(bertrt, model_dir, texts):
    inp = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
    args = [bertrt, "predict", "--model", model_dir, "--words", "--jsonl"]
    try:
        p = subprocess.run(args, input=inp.encode("utf-8"), capture_output=True, check=False)
    except OSError as e:
        fail(f"cannot run {bertrt}: {e} (set BERTRT)")
    if p.returncode != 0:
        fail(f"{' '.join(args)} exited {p.returncode}:\n{p.stderr.decode(errors='replace')}")
    out = [json.loads(l)["words"] for l in p.stdout.decode("utf-8").splitlines() if l.strip()]
    if len(out) != len(texts):
        fail(f"{len(out)} output lines for {len(texts)} texts")
    return out


def main():
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(2)
    model_dir = sys.argv[1]
    if len(sys.argv) == 3:
        with open(sys.argv[2], encoding="utf-8") as f:
            texts = f.read().splitlines()
    else:
        texts = DEFAULT_TEXTS
    bertrt = os.environ.get("BERTRT", "target/release/bertrt")
    with open(os.path.join(model_dir, "bertrt.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("task") != "token-classification":
        fail(f"bertrt.json task is {meta.get('task')!r}, not token-classification (use hf_roundtrip.py)")
    max_len = int(meta["preprocessing"]["max_length"])

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForTokenClassification, AutoTokenizer, BertForTokenClassification

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model, problems = load_model(BertForTokenClassification, AutoModelForTokenClassification, model_dir)
    if problems:
        fail("transformers/PEFT loading reported:\n  " + "\n  ".join(problems))
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if list(meta["labels"]) != labels:
        fail(f"config.json id2label {labels} != bertrt.json labels {meta['labels']}")

    rt = bertrt_words(bertrt, model_dir, texts)
    print(f"model     {model_dir}")
    print(f"versions  torch {torch.__version__}, transformers {transformers.__version__}")
    route = ("PEFT adapters: AutoModelForTokenClassification + PeftModel.from_pretrained"
             if is_adapter_dir(model_dir) else "BertForTokenClassification")
    print(f"loading   ok ({route}; no missing/unexpected keys); labels {labels}")
    print(f"max_length {max_len}   tolerance {TOL:g}")
    print()
    hdr = f"{'#':>2}  {'text':<34} {'words':>5} {'cut':>4} {'max|dlogit|':>11}  ok"
    print(hdr)
    print("-" * len(hdr))
    failures, worst = 0, 0.0
    for i, (text, words) in enumerate(zip(texts, rt)):
        shown = json.dumps(text, ensure_ascii=False)
        shown = shown if len(shown) <= 34 else shown[:31] + "..."
        for w in words:
            chars = text[w["start"]:w["end"]]
            if chars != w["text"]:
                fail(f"text {i}: offsets {w['start']}..{w['end']} slice {chars!r}, not {w['text']!r}")
        if not words:
            print(f"{i:>2}  {shown:<34} {0:>5} {0:>4} {0.0:>11.2e}  ok")
            continue
        enc = tok([w["text"] for w in words], is_split_into_words=True, truncation=True,
                  max_length=max_len, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0].double().numpy()
        first = {}
        for pos, word in enumerate(enc.word_ids(0)):
            if word is not None and word not in first:
                first[word] = pos
        dl, ok = 0.0, True
        for w_index, w in enumerate(words):
            if (w_index in first) != (w["logits"] is not None):
                ok = False
                continue
            if w["logits"] is None:
                continue
            hf = logits[first[w_index]]
            dl = max(dl, float(np.abs(hf - np.array(w["logits"], dtype=np.float64)).max()))
            ok &= labels[int(np.argmax(hf))] == w["tag"]
        ok &= dl <= TOL
        worst = max(worst, dl)
        failures += not ok
        cut = sum(w["logits"] is None for w in words)
        print(f"{i:>2}  {shown:<34} {len(words):>5} {cut:>4} {dl:>11.2e}  {'ok' if ok else 'FAIL'}")
    print()
    print(f"{len(texts) - failures}/{len(texts)} passed; worst max|dlogit| {worst:.2e} (tolerance {TOL:g})")
    if failures:
        fail(f"{failures} of {len(texts)} texts differ")
    print("hf_roundtrip_ner: PASS")


if __name__ == "__main__":
    main()
