#!/usr/bin/env python3
"""Check that a bertrt-written model directory loads in Hugging Face
transformers and predicts what bertrt predicts.

Usage: scripts/hf_roundtrip.py MODEL_DIR [TEXTS_FILE]

  MODEL_DIR   a `bertrt finetune` output: config.json (id2label/label2id),
              model.safetensors (bert.* / classifier.*), tokenizer.json,
              bertrt.json; or, instead of model.safetensors, LoRA adapters
              (adapter_config.json + adapter_model.safetensors)
  TEXTS_FILE  texts to compare: one per line, or, for a .jsonl file, one JSON
              string or {"text": ...} per line. Default: a built-in list
              (empty string, unicode, a text longer than max_length, ...).

Loads the directory with transformers.BertForSequenceClassification and
AutoTokenizer -- an adapter directory (`finetune --lora-rank` without
--merge-lora) as a PEFT user does: AutoModelForSequenceClassification on the
base that adapter_config.json names, with the directory's labels, then
peft.PeftModel.from_pretrained(model, MODEL_DIR) (load_peft_reporting) --
runs each text alone (no padding), and compares softmax(hf_logits / T) -- T =
bertrt.json "temperature" -- (sigmoid(hf_logits) for problem_type
multi_label_classification; the one raw output for problem_type regression,
against bertrt's "score") with the probabilities of
`$BERTRT predict --model MODEL_DIR --jsonl`, and the decisions, with the
decision thresholds of bertrt.json applied on both sides (BERTRT defaults to
target/release/bertrt). Also compares token ids with `$BERTRT tokenize`.
Fails (exit 1) when loading reports missing/unexpected/mismatched weights (an
adapter directory: also PEFT's warnings, and adapter/head tensors PEFT did not
load bit for bit), when a max abs probability difference exceeds TOL (env
HF_ROUNDTRIP_TOL, default 1e-4), when the predicted labels differ, or when the
token ids differ. Needs bench/.venv (bench/setup-venv.sh, with peft).
"""

import json
import os
import subprocess
import sys

DEFAULT_TEXTS = [
    "",
    "I absolutely loved this movie, the acting was superb!",
    "This is the worst purchase I have ever made. Do not buy.",
    "The package arrived on Tuesday.",
    "Héllo wörld! Ça va? Naïve café, Straße, ÅNGSTRÖM",
    "你好，世界。これは日本語です。안녕하세요",
    "great product 🙂👍🏽 would buy again!!! :-)",
    "   leading and trailing   whitespace\tand\ttabs   ",
    "line one\nline two\r\nline three",
    "ALL CAPS SHOUTING ABOUT A TERRIBLE, HORRIBLE DAY",
    "don't won't can't isn't it's 3.14 $100 #hashtag @user http://example.com/a?b=c",
    " ".join(["The plot meanders for a long while, but the final act is genuinely moving "
              "and the soundtrack is wonderful."] * 20),
]

TOL = float(os.environ.get("HF_ROUNDTRIP_TOL", "1e-4"))
# Buffers some transformers versions save/expect that carry no weights.
IGNORABLE_KEYS = {"bert.embeddings.position_ids"}


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def load_reporting(model_class, model_dir, allow_missing=(), unexpected_ok=False, **kwargs):
    """`model_class.from_pretrained(model_dir, **kwargs)` and what its
    loading info reports (missing/unexpected/mismatched keys, errors),
    weightless buffers and the missing keys in `allow_missing` left out, and
    unexpected keys only noted (on stderr) when `unexpected_ok`; also used by
    hf_roundtrip_ner.py."""
    model, info = model_class.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        keys = [k for k in info.get(kind, []) if not (isinstance(k, str) and k in IGNORABLE_KEYS)]
        if kind == "missing_keys":
            keys = [k for k in keys if k not in allow_missing]
        if keys and kind == "unexpected_keys" and unexpected_ok:
            print(f"[load] {model_dir}: unused by {model_class.__name__}: {sorted(keys)}", file=sys.stderr)
        elif keys:
            problems.append(f"{kind}: {keys}")
    return model, problems


def is_adapter_dir(model_dir):
    """Whether `model_dir` holds PEFT adapters (`bertrt finetune --lora-rank`
    without --merge-lora) rather than a whole model."""
    return os.path.exists(os.path.join(model_dir, ADAPTER_CONFIG))


def load_model(model_class, auto_class, model_dir):
    """The model in `model_dir` as a Hugging Face user loads it, and the
    loading problems: a whole model through `load_reporting(model_class)`, an
    adapter directory through `load_peft_reporting(auto_class)`; also used by
    hf_roundtrip_ner.py."""
    if is_adapter_dir(model_dir):
        return load_peft_reporting(auto_class, model_dir)
    return load_reporting(model_class, model_dir)


def load_peft_reporting(auto_class, adapter_dir):
    """An adapter directory loaded as a PEFT user loads it: the base model
    named by adapter_config.json's `base_model_name_or_path`, with the labels
    and problem type of the directory's config.json, through
    `auto_class.from_pretrained`, then `PeftModel.from_pretrained(model,
    adapter_dir)`. Returns the PeftModel and the problems:
      - the base load's missing/mismatched keys, except the saved modules
        the adapter file supplies (the new task head); its unexpected keys
        are tensors of the base checkpoint that the task model has no use
        for (the pooler under a token classifier), as in any fine-tune from
        that base, and are only noted;
      - every warning PEFT gives while loading (missing adapter keys, ...);
      - PEFT's view of the adapter after loading (`get_peft_model_state_dict`,
        what `save_pretrained` would write) against adapter_model.safetensors:
        keys PEFT has that the file lacks (missing), keys of the file PEFT
        does not have (unexpected: silently dropped at load), and tensors
        not loaded bit for bit."""
    import warnings

    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, ADAPTER_CONFIG), encoding="utf-8") as f:
        adapter_config = json.load(f)
    with open(os.path.join(adapter_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    base = adapter_config.get("base_model_name_or_path")
    if not base or not os.path.exists(base):
        return None, [f"{ADAPTER_CONFIG}: base_model_name_or_path {base!r} is not a directory here"]
    saved = load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    problems = [f"{ADAPTER_WEIGHTS}: {k} lacks the prefix {PEFT_PREFIX!r}"
                for k in saved if not k.startswith(PEFT_PREFIX)]
    head = {k[len(PEFT_PREFIX):] for k in saved if ".lora_" not in k}
    labels = {"id2label": {int(i): l for i, l in config["id2label"].items()},
              "label2id": config["label2id"]}
    if config.get("problem_type"):
        labels["problem_type"] = config["problem_type"]
    model, base_problems = load_reporting(auto_class, base, allow_missing=head, unexpected_ok=True,
                                          **labels)
    problems += [f"base {base}: {p}" for p in base_problems]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(model, adapter_dir)
        except Exception as e:  # noqa: BLE001 -- e.g. KeyError for a saved module's missing tensor
            return None, problems + [f"PeftModel.from_pretrained raised {type(e).__name__}: {e}"]
    for w in caught:
        print(f"[load] {w.category.__name__}: {w.message}", file=sys.stderr)
    # Deprecation notices (transformers APIs PEFT still calls) say nothing
    # about the adapter; any other warning PEFT gives while loading does.
    problems += [f"PEFT warned: {w.category.__name__}: {w.message}" for w in caught
                 if "peft" in w.filename.replace(os.sep, "/")
                 and not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    loaded = get_peft_model_state_dict(model)
    if missing := sorted(set(loaded) - set(saved)):
        problems.append(f"missing adapter/head keys (PEFT has, {ADAPTER_WEIGHTS} lacks): {missing}")
    if unexpected := sorted(set(saved) - set(loaded)):
        problems.append(f"unexpected keys (in {ADAPTER_WEIGHTS}, not loaded by PEFT): {unexpected}")
    if differ := sorted(k for k in set(saved) & set(loaded)
                        if not torch.equal(saved[k], loaded[k].detach().cpu().to(saved[k].dtype))):
        problems.append(f"tensors PEFT holds that differ from {ADAPTER_WEIGHTS}: {differ}")
    return model, problems


def fail(msg):
    print(f"hf_roundtrip: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def read_texts(path):
    with open(path, encoding="utf-8") as f:
        data = f.read()
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not path.endswith(".jsonl"):
        return lines
    texts = []
    for i, line in enumerate(lines, 1):
        v = json.loads(line)
        if isinstance(v, dict):
            v = v["text"]
        if not isinstance(v, str):
            fail(f"{path}:{i}: expected a JSON string or {{\"text\": ...}}")
        texts.append(v)
    return texts


def run_bertrt(bertrt, args, texts):
    inp = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
    try:
        p = subprocess.run([bertrt, *args, "--jsonl"], input=inp.encode("utf-8"),
                           capture_output=True, check=False)
    except OSError as e:
        fail(f"cannot run {bertrt}: {e} (set BERTRT)")
    if p.returncode != 0:
        fail(f"{bertrt} {' '.join(args)} exited {p.returncode}:\n{p.stderr.decode(errors='replace')}")
    out = [json.loads(l) for l in p.stdout.decode("utf-8").splitlines() if l.strip()]
    if len(out) != len(texts):
        fail(f"{bertrt} {' '.join(args)}: {len(out)} output lines for {len(texts)} texts")
    return out


def main():
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(2)
    model_dir = sys.argv[1]
    texts = read_texts(sys.argv[2]) if len(sys.argv) == 3 else DEFAULT_TEXTS
    if not texts:
        fail("no texts")
    bertrt = os.environ.get("BERTRT", "target/release/bertrt")

    with open(os.path.join(model_dir, "bertrt.json"), encoding="utf-8") as f:
        meta = json.load(f)
    pre = meta.get("preprocessing", {})
    max_len = int(pre.get("max_length", 512))
    temperature = float(meta.get("temperature", (meta.get("calibration") or {}).get("temperature", 1.0)))
    if pre.get("pooling", "pooler") != "pooler":
        fail(f"bertrt.json pooling is {pre.get('pooling')!r}: only 'pooler' models are "
             "BertForSequenceClassification-compatible")
    if pre.get("text_pair"):
        fail("sentence-pair models are not supported by this check")

    import numpy as np
    import torch
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              BertForSequenceClassification)

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    transformers.logging.set_verbosity_error()  # we check loading_info ourselves
    transformers.logging.disable_progress_bar()

    model, problems = load_model(BertForSequenceClassification, AutoModelForSequenceClassification,
                                 model_dir)
    if problems:
        fail("transformers/PEFT loading reported:\n  " + "\n  ".join(problems))
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    labels = [id2label[i] for i in range(len(id2label))]
    if meta.get("labels") and list(meta["labels"]) != labels:
        fail(f"config.json id2label {labels} != bertrt.json labels {meta['labels']}")

    multi_label = model.config.problem_type == "multi_label_classification"
    regression = model.config.problem_type == "regression"
    thresholds = (meta.get("thresholds") or {}).get("values", {})

    def decide(p):
        """The label(s) bertrt predicts from probabilities `p` (label order)."""
        if multi_label:
            return "|".join(l for l, pi in zip(labels, p) if pi >= thresholds.get(l, 0.5))
        if len(labels) == 2 and labels[1] in thresholds:
            return labels[1] if p[1] >= thresholds[labels[1]] else labels[0]
        return labels[int(np.argmax(p))]

    preds = run_bertrt(bertrt, ["predict", "--model", model_dir], texts)
    toks = run_bertrt(bertrt, ["tokenize", "--model", model_dir, "--max-length", str(max_len)], texts)

    print(f"model     {model_dir}")
    print(f"versions  torch {torch.__version__}, transformers {transformers.__version__}")
    route = ("PEFT adapters: AutoModelForSequenceClassification + PeftModel.from_pretrained"
             if is_adapter_dir(model_dir) else "BertForSequenceClassification")
    print(f"loading   ok ({route}; no missing/unexpected/mismatched keys); labels {labels}")
    print(f"T         {temperature:.6g}   max_length {max_len}   tolerance {TOL:g}")
    print()
    hdr = f"{'#':>2}  {'text':<34} {'ntok':>4} {'ids':>4}  {'hf':<9} {'bertrt':<9} {'max|dp|':>9} {'max|dlogit|':>11}  ok"
    print(hdr)
    print("-" * len(hdr))

    failures = 0
    worst = 0.0
    for i, text in enumerate(texts):
        enc = tok(text, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0].double().numpy()
        ids_hf = enc["input_ids"][0].tolist()
        ids_ok = ids_hf == toks[i]["ids"]
        shown = json.dumps(text, ensure_ascii=False)
        shown = shown if len(shown) <= 34 else shown[:31] + "..."
        if regression:
            # One output, compared as is: HF's logit is the predicted score.
            s_hf, s_rt = float(logits[0]), float(preds[i]["score"])
            dp = abs(s_hf - s_rt)
            ok = dp <= TOL and ids_ok
            worst = max(worst, dp)
            failures += not ok
            print(f"{i:>2}  {shown:<34} {len(ids_hf):>4} {'same' if ids_ok else 'DIFF':>4}  "
                  f"{s_hf:<9.4f} {s_rt:<9.4f} {dp:>9.2e} {dp:>11.2e}  {'ok' if ok else 'FAIL'}")
            continue
        if multi_label:
            p_hf = 1.0 / (1.0 + np.exp(-logits))
        else:
            z = logits / temperature
            p_hf = np.exp(z - z.max())
            p_hf /= p_hf.sum()
        probs = preds[i]["probs"]
        if set(probs) != set(labels):
            fail(f"bertrt labels {sorted(probs)} != {labels}")
        p_rt = np.array([probs[l] for l in labels], dtype=np.float64)
        dp = float(np.abs(p_hf - p_rt).max())
        if multi_label:
            # bertrt's probs -> logits: the inverse sigmoid
            p_clip = np.clip(p_rt, 1e-300, 1 - 1e-16)
            dl = float(np.abs(np.log(p_clip / (1 - p_clip)) - logits).max())
            rt_label = "|".join(preds[i]["labels"])
        else:
            # bertrt's probs -> logits up to a constant, comparable to HF's logits / T * T
            lr = np.log(np.maximum(p_rt, 1e-300)) * temperature
            dl = float(np.abs((lr - lr.mean()) - (logits - logits.mean())).max())
            rt_label = preds[i]["label"]
        hf_label = decide(p_hf)
        ok = dp <= TOL and hf_label == rt_label and ids_ok
        worst = max(worst, dp)
        failures += not ok
        print(f"{i:>2}  {shown:<34} {len(ids_hf):>4} {'same' if ids_ok else 'DIFF':>4}  "
              f"{hf_label:<9} {rt_label:<9} {dp:>9.2e} {dl:>11.2e}  {'ok' if ok else 'FAIL'}")
        if not ids_ok:
            print(f"    token ids differ: hf {ids_hf[:24]}... bertrt {toks[i]['ids'][:24]}...")

    print()
    print(f"{len(texts) - failures}/{len(texts)} passed; worst max|dp| {worst:.2e} (tolerance {TOL:g})")
    if failures:
        fail(f"{failures} of {len(texts)} texts differ")
    print("hf_roundtrip: PASS")


if __name__ == "__main__":
    main()
