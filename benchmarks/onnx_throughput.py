"""The embedded default model (DINOv2-S + Fashion-MNIST head) in onnxruntime, unmerged and merged, next to PyTorch.

Each r is exported once with ``hf_tome.export`` (ONNX, float32, dynamic batch axis) and timed in onnxruntime and in
PyTorch (float32, the same patched model) on the same inputs with the same number of threads. Settings are timed in
round-robin rounds so slow drift of the machine hits all of them alike; the median round is reported. The JSON
records images/s, speed-ups against the unmerged ONNX model and against PyTorch at the same r, GMACs, and the
largest |onnxruntime - PyTorch| on the timed batch.

    python benchmarks/onnx_throughput.py                  # r = 0, 14, 21; batch 32; 2 threads; 5 rounds
    python benchmarks/onnx_throughput.py --quick          # smoke run: batch 2, 1 round (JSON in the temp folder)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
import transformers
from allocator_option import add_allocator_option, apply_allocator_option
from tqdm import tqdm

import hf_tome
from hf_tome.evaluation.assets.default_model import default_model_path
from hf_tome.export.onnx import export_onnx
from hf_tome.export.options import DEFAULT_OPSET

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_throughput.json"
TARGET_SPEEDUP = 1.5  # the merged ONNX model at r=14 against the unmerged ONNX model


def _session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # No busy-waiting after a run: its spinning threads would take the cores from the PyTorch run timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _timer(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(model_path: Path, r_values: list[int], batch: int, rounds: int, threads: int, exporter: str,
            opset: int, workdir: Path) -> list[dict]:
    torch.set_num_threads(threads)
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    feed = {"pixel_values": pixels.numpy()}
    model = hf_tome.AutoModelForImageClassification.from_pretrained(model_path, dtype=torch.float32).eval()
    runners, rows = {}, {}
    for r in r_values:
        hf_tome.apply(model, r=r)
        start = time.perf_counter()
        result = export_onnx(model, workdir / f"r{r}", exporter=exporter, opset=opset, validate=False)
        export_seconds = time.perf_counter() - start
        session = _session(result.onnx_file, threads)
        plan = hf_tome.build_plan(model, hf_tome.ToMeConfig.from_dict(model.config.tome))  # what was exported
        with torch.inference_mode():
            expected = model(pixel_values=pixels).logits
        difference = (torch.from_numpy(session.run(["logits"], feed)[0]) - expected).abs().max().item()
        report = hf_tome.compute_report(model)
        rows[r] = {"r": r, "gmacs": report.gmacs, "tokens_per_layer": report.tokens_in,
                   "export_seconds": export_seconds, "max_abs_diff_onnx_vs_pytorch": difference}

        def run_torch(plan=plan):
            with torch.inference_mode():
                model(pixel_values=pixels, tome_plan=plan)

        runners[("onnx", r)] = lambda session=session: session.run(["logits"], feed)
        runners[("pytorch", r)] = run_torch
    for run in runners.values():  # warm-up
        run()
    timings: dict[tuple[str, int], list[float]] = {key: [] for key in runners}
    for _ in tqdm(range(rounds), desc="rounds"):
        for key, run in runners.items():
            timings[key].append(_timer(run))
    base = batch / statistics.median(timings[("onnx", r_values[0])])
    for r, row in rows.items():
        onnx_speed = batch / statistics.median(timings[("onnx", r)])
        torch_speed = batch / statistics.median(timings[("pytorch", r)])
        row.update(onnx_images_per_s=onnx_speed, pytorch_images_per_s=torch_speed,
                   onnx_speedup_vs_unmerged_onnx=onnx_speed / base, onnx_vs_pytorch=onnx_speed / torch_speed,
                   onnx_seconds_per_batch=timings[("onnx", r)], pytorch_seconds_per_batch=timings[("pytorch", r)])
    return list(rows.values())


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| r | GMACs | PyTorch images/s | ONNX Runtime images/s | ONNX vs unmerged ONNX | ONNX vs PyTorch | "
          "max abs diff |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['r']} | {row['gmacs']:.2f} | {row['pytorch_images_per_s']:.2f} | "
              f"{row['onnx_images_per_s']:.2f} | {row['onnx_speedup_vs_unmerged_onnx']:.2f}x | "
              f"{row['onnx_vs_pytorch']:.2f}x | {row['max_abs_diff_onnx_vs_pytorch']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="image classifier folder (default: embedded model)")
    parser.add_argument("--r", type=int, nargs="+", default=[0, 14, 21], help="r values (the first is the baseline)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (20 has a fused GELU)")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, 1 round")
    add_allocator_option(parser, "PyTorch's forwards then fault in fresh pages, while onnxruntime keeps its own "
                                 "memory arena either way")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON file (default: {RESULTS}; with --quick, one in the temp folder)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rounds = 2, 1
    out = args.out or (Path(tempfile.gettempdir()) / "onnx_throughput_quick.json" if args.quick else RESULTS)
    model_path = args.model or default_model_path()
    kept_freed_memory = apply_allocator_option(args)
    with tempfile.TemporaryDirectory() as workdir:
        rows = measure(model_path, args.r, args.batch, args.rounds, args.threads, args.exporter, args.opset,
                       Path(workdir))
    title = (f"{model_path.name}, 224 px, batch {args.batch}, float32, {args.threads} threads, onnxruntime "
             f"{onnxruntime.__version__} ({args.exporter} export, opset {args.opset}) vs PyTorch {torch.__version__}")
    print_table(title, rows)
    by_r = {row["r"]: row for row in rows}
    targets = {}
    if 14 in by_r and args.r[0] == 0:
        targets = {"onnx_r14_vs_unmerged_onnx": by_r[14]["onnx_speedup_vs_unmerged_onnx"], "target": TARGET_SPEEDUP,
                   "met": by_r[14]["onnx_speedup_vs_unmerged_onnx"] >= TARGET_SPEEDUP,
                   "onnx_faster_than_pytorch_at_r14": by_r[14]["onnx_vs_pytorch"] > 1}
        verdict = "met" if targets["met"] else "missed"
        print(f"\nr=14: ONNX {targets['onnx_r14_vs_unmerged_onnx']:.2f}x the unmerged ONNX model (target "
              f"{TARGET_SPEEDUP}x: {verdict}), {by_r[14]['onnx_vs_pytorch']:.2f}x PyTorch at r=14")
    report = {"title": title, "model": str(model_path), "batch": args.batch, "rounds": args.rounds,
              "quick": args.quick, "exporter": args.exporter, "opset": args.opset,
              "keep_freed_memory": kept_freed_memory,
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "onnxruntime": onnxruntime.__version__},
              "rows": rows, "targets": targets}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
