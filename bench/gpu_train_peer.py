#!/usr/bin/env python3
"""PyTorch training throughput on the GPU: the peer for bertrt's CUDA training.

Issue 6 asks for a side-by-side training benchmark against PyTorch on the same
GPU, measured in the same device run as bertrt's own timing test, so that both
numbers come from one machine, one driver and one clock state. This script is
the PyTorch half; scripts/gpu-check.sh runs it after the bertrt test binaries
and puts the two sides in one table.

For each model shape (random, seeded weights: the speed of a step does not
depend on the values) it trains transformers' BertForSequenceClassification
(num_labels=3, SDPA attention) with AdamW (lr 2e-5, weight decay 0.01, fused
when this torch has it) on random full-length batches: every token real, the
attention mask all ones, random labels. Modes:

    bf16  torch.autocast(bfloat16)
    fp16  torch.autocast(float16) with torch.amp.GradScaler
    fp32  no autocast, TF32 off (true fp32 matmuls, like bertrt's fp32)

Each (model, mode) gets fresh weights and optimizer, 5 warm-up steps, then
--steps timed steps between two synchronizations. Peak memory is
torch.cuda.max_memory_allocated since just before warm-up (weights, grads,
AdamW state and activations). One line per result:

    timing: pytorch <model> <mode> train b<batch> s<seq>: <ms> ms/step, \
<samples/s> samples/s, peak <MiB> MiB (torch <version>, <device name>)

and, with --json PATH, all results (skips and failures included) as a JSON list.
Exit status 1 if any run failed; a mode this device cannot run (fp16 autocast
on some CPUs) is skipped with a message, not a failure.

--device cpu with tiny sizes checks the script without a GPU, e.g.
    bench/.venv/bin/python bench/gpu_train_peer.py --device cpu \
        --models minilm-l6 --steps 2 --batch 2 --seq 16
(peak memory then reads n/a: there is no allocator counter on the CPU).
"""

import argparse
import contextlib
import gc
import json
import platform
import sys
import time

MODEL_SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
SHARED_SHAPE = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
MODES = ("bf16", "fp16", "fp32")
NUM_LABELS = 3
WARMUP_STEPS = 5
# A few distinct batches, cycled, so no step reuses the previous step's input.
DISTINCT_BATCHES = 4


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODEL_SHAPES), help="comma-separated: " + ", ".join(MODEL_SHAPES))
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--skip", default="", help="comma-separated MODEL:MODE pairs not to run, e.g. bert-base:fp32")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run (after %d warm-up)" % WARMUP_STEPS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write all results as a JSON list here")
    args = ap.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    for m in args.models:
        if m not in MODEL_SHAPES:
            ap.error(f"unknown model {m!r}; known: {', '.join(MODEL_SHAPES)}")
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    if args.steps < 1 or args.batch < 1 or args.seq < 2 or args.seq > SHARED_SHAPE["max_position_embeddings"]:
        ap.error("need --steps >= 1, --batch >= 1 and 2 <= --seq <= 512")
    return args


def device_name(torch, device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def build_model(torch, model_name, device, seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(**MODEL_SHAPES[model_name], **SHARED_SHAPE, num_labels=NUM_LABELS,
                        attn_implementation="sdpa")
    model = BertForSequenceClassification(config).to(device)
    model.train()
    return model


def build_optimizer(torch, model):
    """AdamW, fused (one kernel for all parameters) where this torch supports it."""
    kwargs = dict(lr=2e-5, weight_decay=0.01)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs), True
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kwargs), False


def random_batches(torch, device, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(DISTINCT_BATCHES):
        ids = torch.randint(1000, SHARED_SHAPE["vocab_size"], (batch, seq), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        batches.append(dict(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            token_type_ids=torch.zeros_like(ids).to(device),
            labels=torch.randint(0, NUM_LABELS, (batch,), generator=g).to(device),
        ))
    return batches


def unsupported_reason(torch, device, mode):
    """Why this device cannot run `mode`, or None. Autocast with a dtype the
    device lacks only warns and runs in fp32, which would mislabel the result."""
    if mode == "fp32":
        return None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    if device.type == "cuda" and mode == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device.type, dtype=dtype):
                enabled = torch.is_autocast_enabled(device.type)
        except (RuntimeError, TypeError) as e:
            return f"autocast {mode} on {device.type}: {e}"
    return None if enabled else f"autocast {mode} is not supported on {device.type} by torch {torch.__version__}"


def synchronize(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(torch, args, device, model_name, mode):
    """Trains WARMUP_STEPS + args.steps steps; returns the result fields."""
    if device.type == "cuda":
        gc.collect()  # the previous run's model and optimizer (or a failed run's traceback) go first
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(torch, model_name, device, args.seed)
    optimizer, fused = build_optimizer(torch, model)
    batches = random_batches(torch, device, args.batch, args.seq, args.seed)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)
    # fp16's narrow range needs loss scaling; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def step(i):
        batch = batches[i % len(batches)]
        with autocast():
            loss = model(**batch).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(WARMUP_STEPS):
        step(i)
    synchronize(torch, device)
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(WARMUP_STEPS + i)
    synchronize(torch, device)
    seconds = time.perf_counter() - start
    last_loss = float(loss.detach().float())  # read after timing: .item() would synchronize every step

    result = dict(
        ms_per_step=1000.0 * seconds / args.steps,
        samples_per_s=args.batch * args.steps / seconds,
        peak_mib=None, peak_reserved_mib=None,
        last_loss=last_loss, fused_adamw=fused,
        attn_implementation=model.config._attn_implementation,
    )
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    del model, optimizer, batches
    return result


def main():
    args = parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        message = f"no CUDA device visible to torch {torch.__version__} (--device cpu tries the script without one)"
        print(f"FAILED: {message}", flush=True)
        write_json(args.json, [dict(framework="pytorch", torch=torch.__version__, status="failed", error=message)])
        return 1
    # fp32 means fp32: TF32 would round matmul inputs to 10 mantissa bits.
    # False is PyTorch's default already; setting it guards against an
    # environment that turned it on. Autocast modes are unaffected.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    gpu = device_name(torch, device)
    common = dict(framework="pytorch", torch=torch.__version__, transformers=transformers.__version__,
                  device=gpu, batch=args.batch, seq=args.seq, warmup_steps=WARMUP_STEPS, steps=args.steps)
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {device}: {gpu}; "
          f"batch {args.batch} x seq {args.seq}, {WARMUP_STEPS} warm-up + {args.steps} timed steps", flush=True)

    results, failed = [], False
    for model_name in args.models:
        for mode in args.modes:
            if f"{model_name}:{mode}" in args.skip:
                continue
            entry = dict(common, model=model_name, mode=mode)
            label = f"pytorch {model_name} {mode} train b{args.batch} s{args.seq}"
            reason = unsupported_reason(torch, device, mode)
            if reason:
                print(f"skipped: {label}: {reason}", flush=True)
                results.append(dict(entry, status="skipped", error=reason))
                continue
            try:
                r = run_one(torch, args, device, model_name, mode)
            except Exception as e:  # e.g. out of memory: report it, go on with the other runs
                failed = True
                message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"FAILED: {label}: {message}", flush=True)
                results.append(dict(entry, status="failed", error=message))
                continue
            results.append(dict(entry, status="ok", **r))
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
            print(f"timing: {label}: {r['ms_per_step']:.2f} ms/step, {r['samples_per_s']:.1f} samples/s, "
                  f"peak {peak} MiB (torch {torch.__version__}, {gpu})", flush=True)
            print(f"#   last loss {r['last_loss']:.4f}, attention {r['attn_implementation']}, "
                  f"fused AdamW {r['fused_adamw']}", flush=True)

    write_json(args.json, results)
    return 1 if failed else 0


def write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
