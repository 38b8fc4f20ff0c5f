#!/usr/bin/env python3
"""ONNX Runtime encoder latency, the CPU peer bertrt is measured against.

Exports a Hugging Face BERT encoder to ONNX (eager attention, the
TorchScript exporter, opset 17, dynamic batch and sequence axes), runs ONNX
Runtime's transformer optimizer on it (attention/LayerNorm/GELU fusion), and
quantizes that with quantize_dynamic (int8 weights, dynamic activations).
Then times each variant on the shapes bertrt's encoder bench uses: batch 1 at
sequence 16..512 and 32 x 128, random ordinary word pieces between [CLS] and
[SEP], attention mask all ones. Prints p50/p95/p99 per shape and writes JSON.

Usage: bench/.venv/bin/python bench/ort_latency.py --model DIR --work DIR
           [--threads 2] [--iterations 50] [--json OUT]
"""

import argparse
import json
import os
import statistics
import time

SHAPES = [(1, 16), (1, 32), (1, 64), (1, 128), (1, 256), (1, 512), (32, 128)]


def export(model_dir, work, threads):
    """fp32 ONNX, its ORT-optimized version and the int8 one; paths by name."""
    import torch
    from transformers import AutoConfig, AutoModel
    from onnxruntime.transformers import optimizer
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.set_num_threads(threads)
    os.makedirs(work, exist_ok=True)
    paths = {
        "fp32": os.path.join(work, "encoder.onnx"),
        "fp32-opt": os.path.join(work, "encoder-opt.onnx"),
        "int8": os.path.join(work, "encoder-opt-int8.onnx"),
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    config = AutoConfig.from_pretrained(model_dir)
    bert = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        """The last hidden states only, from positional inputs (the
        TorchScript exporter traces positional arguments)."""

        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    model = Encoder().eval()
    ids = torch.randint(2000, 22000, (2, 16))
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    axes = {0: "batch", 1: "seq"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            inputs,
            paths["fp32"],
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={n: axes for n in ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
            opset_version=17,
            dynamo=False,
        )
    optimized = optimizer.optimize_model(
        paths["fp32"],
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
    )
    optimized.save_model_to_file(paths["fp32-opt"])
    import onnx

    # The fused ops (com.microsoft domain) defeat shape inference; their
    # outputs are f32.
    quantize_dynamic(
        paths["fp32-opt"],
        paths["int8"],
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return paths


def session(path, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feeds(batch, seq, sess):
    import numpy as np

    rng = np.random.default_rng(batch * 1000 + seq)
    ids = rng.integers(2000, 22000, size=(batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    all_inputs = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }
    wanted = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in all_inputs.items() if k in wanted}


def percentile(sorted_ms, p):
    return sorted_ms[round(p / 100 * (len(sorted_ms) - 1))]


def measure(sess, batch, seq, iterations):
    inputs = feeds(batch, seq, sess)
    for _ in range(max(3, iterations // 10)):
        sess.run(None, inputs)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        sess.run(None, inputs)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "batch": batch,
        "seq": seq,
        "samples": len(times),
        "p50_ms": percentile(times, 50),
        "p95_ms": percentile(times, 95),
        "p99_ms": percentile(times, 99),
        "mean_ms": statistics.fmean(times),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--work", required=True, help="where the ONNX files go (reused when present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()

    import onnxruntime

    paths = export(args.model, args.work, args.threads)
    report = {"onnxruntime": onnxruntime.__version__, "threads": args.threads, "variants": {}}
    for name, path in paths.items():
        sess = session(path, args.threads)
        rows = []
        for batch, seq in SHAPES:
            # Fewer iterations where one takes long; at least 20 for a p99.
            iterations = max(20, args.iterations // max(1, batch * seq // 256))
            row = measure(sess, batch, seq, iterations)
            rows.append(row)
            print(f"ort {name:<9} {batch:>2}x{seq:<4} p50 {row['p50_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f}  p99 {row['p99_ms']:8.2f}", flush=True)
        report["variants"][name] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
