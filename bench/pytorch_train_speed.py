#!/usr/bin/env python3
"""PyTorch CPU fine-tuning throughput, the reference for bertrt's training speed.

Trains BertForSequenceClassification (num_labels=3) from a local model
directory on random full-length batches (random token ids, attention mask all
ones) with AdamW, in fp32 and with bf16 autocast, and prints samples/s.

Usage: bench/.venv/bin/python bench/pytorch_train_speed.py [--model DIR]
           [--batch-size 16] [--seq-len 128] [--threads 2] [--warmup 3]
           [--steps 10] [--modes fp32,bf16] [--json]
Set up the venv with bench/setup-venv.sh.
"""

import argparse
import json
import os
import platform
import statistics
import time


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in fl]
    except OSError:
        pass
    return []


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(here, "..", "assets", "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16 (bf16 = autocast)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON line of results")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import BertForSequenceClassification

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected
    transformers.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, cpu: {cpu_model()} [{' '.join(cpu_flags())}]")
    try:
        print(f"load average {os.getloadavg()[0]:.2f} over 1 min on {os.cpu_count()} CPUs")
    except OSError:
        pass
    print(f"model {os.path.normpath(args.model)}, batch {args.batch_size} x seq {args.seq_len}, "
          f"AdamW lr {args.lr}, {args.warmup} warm-up + {args.steps} timed steps")

    results = {}
    for mode in args.modes.split(","):
        mode = mode.strip()
        if mode not in ("fp32", "bf16"):
            raise SystemExit(f"unknown mode {mode!r}")
        torch.manual_seed(args.seed)
        model = BertForSequenceClassification.from_pretrained(args.model, num_labels=3)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(args.seed)
        batches = []
        for _ in range(4):
            ids = torch.randint(1000, vocab, (args.batch_size, args.seq_len), generator=g)
            ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
            batches.append(dict(input_ids=ids,
                                attention_mask=torch.ones_like(ids),
                                token_type_ids=torch.zeros_like(ids),
                                labels=torch.randint(0, 3, (args.batch_size,), generator=g)))

        def step(i):
            b = batches[i % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode == "bf16")):
                loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        for i in range(args.warmup):
            step(i)
        times = []
        c0 = time.process_time()
        for i in range(args.steps):
            t0 = time.perf_counter()
            loss = step(i)
            times.append(time.perf_counter() - t0)
        cpu = time.process_time() - c0
        total = sum(times)
        sps = args.batch_size * args.steps / total
        med = args.batch_size / statistics.median(times)
        # CPU seconds used / wall seconds: ~threads when the machine is otherwise idle;
        # much lower means other processes took the cores and the numbers are low.
        util = cpu / total
        results[mode] = {"samples_per_s": sps, "median_step_samples_per_s": med,
                         "step_s_mean": total / args.steps, "cpu_utilization": util, "last_loss": loss}
        print(f"{mode:5s} {sps:7.2f} samples/s  (median step {statistics.median(times):.3f} s -> "
              f"{med:.2f} samples/s; min {min(times):.3f} s, max {max(times):.3f} s; "
              f"cores used {util:.2f}/{args.threads}; loss {loss:.3f})", flush=True)
        if util < 0.85 * args.threads:
            print(f"      warning: only {util:.2f} of {args.threads} cores used: the machine is busy, "
                  f"this number is low", flush=True)
        del model, opt

    if "fp32" in results and "bf16" in results:
        print(f"bf16 autocast / fp32: {results['bf16']['samples_per_s'] / results['fp32']['samples_per_s']:.2f}x")
    if args.json:
        print(json.dumps({"batch_size": args.batch_size, "seq_len": args.seq_len,
                          "threads": args.threads, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
