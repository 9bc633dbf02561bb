"""Word error rate and encoder speed of real Whisper tiny.en with token merging in its encoder.

Speech: every sentence of ``hf_tome.evaluation.assets.speech.SENTENCES`` spoken by espeak-ng
(synthetic, clean speech; each
clip is padded to Whisper's 30 s window, so most encoder frames are silence). Settings: the unpatched model and, for
each ``--targets`` value and each ``--inflect`` schedule shape (constant and decreasing by default), the smallest
r whose encoder MACs reduction reaches it, run with every ``--rules`` entry at that same r (so at equal MACs):
``tome`` (bipartite matching, mean merge; the default and only rule unless asked), ``pitome`` (PiToMe's energy
rule), ``mlerp`` (ToMe's matching, MLERP merge), ``pitome+mlerp`` and ``atc+mlerp`` (ATC's average-linkage
clustering, MLERP merge); the rows of rules other than tome are named
with the rule as a suffix (``r=8, mlerp``).
WER comes from greedy ``generate()`` over all sentences; encoder time is the encoder alone on one batch of features,
timed in round-robin rounds (all settings on the same model instance; median and fastest round) in the same run, so
the speedup is a ratio measured under the same machine load.

    python benchmarks/whisper_wer.py                     # targets 1.5x and 2x encoder MACs reduction
    python benchmarks/whisper_wer.py --rounds 5 --targets 1.3 1.5 2.0
    python benchmarks/whisper_wer.py --rules tome pitome mlerp pitome+mlerp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers as T
from tqdm import tqdm

import hf_tome
from hf_tome.evaluation.assets.speech import SENTENCES, speech_dataset, word_error_rate
from hf_tome.evaluation.assets.whisper import whisper_tiny_en_path
from hf_tome.integration.flops import constant_r_for_macs

RULES = {"tome": ("bipartite", "mean", 0), "pitome": ("pitome", "mean", 0), "mlerp": ("bipartite", "mlerp", 0),
         "pitome+mlerp": ("pitome", "mlerp", 0), "mlerp+prune1": ("bipartite", "mlerp", 1),
         "atc+mlerp": ("agglomerative", "mlerp", 0)}
"""Rule name -> (``ToMeConfig.merge_rule``, ``merge_mode``, ``prune_matched_layers``). ``mlerp+prune1`` prunes in
the first of the encoder's 4 layers: the share of depth (a third) that ``decaying_schedule.py`` chose for DINOv2-S
(4 of 12) on training images; nothing was tuned on these clips."""
DEFAULT_RULE = "tome"


def configure(model: torch.nn.Module, config: hf_tome.ToMeConfig | None) -> None:
    if config is None:
        hf_tome.remove(model)
    else:
        hf_tome.apply(model, config)


def build_settings(model: torch.nn.Module, targets: list[float], inflects: list[float],
                   rules: list[str]) -> dict[str, hf_tome.ToMeConfig | None]:
    """``"no merging"``, then for every inflect shape and target the smallest r reaching the MACs reduction, once
    per rule (same r, so the same MACs). tome's rows are named ``r=<r>`` / ``r=(<r>,<inflect>)``, other rules'
    rows get ``, <rule>`` appended."""
    settings: dict[str, hf_tome.ToMeConfig | None] = {"no merging": None}
    for inflect in inflects:
        for target in targets:
            r = constant_r_for_macs(model, 1 / target, inflect=inflect)  # smallest r reaching the reduction
            base = f"r={r}" if inflect == 0 else f"r=({r},{inflect:g})"
            for rule in rules:
                merge_rule, merge_mode, prune_layers = RULES[rule]
                name = base if rule == DEFAULT_RULE else f"{base}, {rule}"
                settings[name] = hf_tome.ToMeConfig(r=r, inflect=inflect, merge_rule=merge_rule,
                                                    merge_mode=merge_mode, prune_matched_layers=prune_layers)
    return settings


def rule_name(config: hf_tome.ToMeConfig | None) -> str:
    """The ``RULES`` name of a setting's merge rule, mode and pruning layers (``-`` for no merging)."""
    if config is None:
        return "-"
    return next(name for name, rule in RULES.items()
                if rule == (config.merge_rule, config.merge_mode, config.prune_matched_layers))


def transcribe(model, processor, features: torch.Tensor, batch: int) -> list[str]:
    texts: list[str] = []
    with torch.inference_mode():
        for start in range(0, features.shape[0], batch):
            tokens = model.generate(features[start : start + batch])
            texts += processor.batch_decode(tokens, skip_special_tokens=True)
    return [text.strip() for text in texts]


def time_encoder(model, features: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.model.encoder(features)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0],
                        help="encoder MACs reductions to pick r for")
    parser.add_argument("--inflect", type=float, nargs="+", default=[0.0, -1.0],
                        help="schedule shapes to try for every target (0 = constant r, -1 = decreasing 2r..0)")
    parser.add_argument("--rules", nargs="+", default=[DEFAULT_RULE], choices=list(RULES),
                        help="merge rules to run at every r (tome = bipartite + mean; the others: see RULES)")
    parser.add_argument("--batch", type=int, default=8, help="clips per generate() call and per timed encoder batch")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (median and best reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("results/whisper_wer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = whisper_tiny_en_path()
    processor = T.WhisperProcessor.from_pretrained(folder)
    model = T.WhisperForConditionalGeneration.from_pretrained(folder).eval()
    dataset = speech_dataset(SENTENCES)
    references = list(dataset["text"])
    features = processor(list(dataset["audio"]), sampling_rate=16000, return_tensors="pt").input_features

    settings = build_settings(model, args.targets, args.inflect, list(dict.fromkeys(args.rules)))

    rows: dict[str, dict] = {}
    for name, config in tqdm(settings.items(), desc="transcribe"):
        configure(model, config)
        report = hf_tome.compute_report(model)
        hypotheses = transcribe(model, processor, features, args.batch)
        rule = config or hf_tome.ToMeConfig()  # no merging records the default rule and mode
        rows[name] = {"r": config.r if config else 0, "inflect": config.inflect if config else 0.0,
                      "merge_rule": rule.merge_rule, "merge_mode": rule.merge_mode,
                      "prune_matched_layers": rule.prune_matched_layers,
                      "encoder_tokens_in": report.tokens_in, "encoder_gmacs": report.gmacs,
                      "wer": word_error_rate(references, hypotheses), "hypotheses": hypotheses}

    timed = features[: args.batch]
    timings: dict[str, list[float]] = {name: [] for name in settings}
    for config in settings.values():  # warm-up, one call per setting
        configure(model, config)
        time_encoder(model, timed)
    for _ in tqdm(range(args.rounds), desc="encoder timing rounds"):
        for name, config in settings.items():
            configure(model, config)
            timings[name].append(time_encoder(model, timed))

    base_name = next(iter(settings))
    base_median, base_best = statistics.median(timings[base_name]), min(timings[base_name])
    base_macs = rows[base_name]["encoder_gmacs"]
    for name, row in rows.items():
        median, best = statistics.median(timings[name]), min(timings[name])
        # The fastest round is the one least disturbed by other processes on a shared machine; both are kept.
        row.update(encoder_seconds_per_batch=timings[name], encoder_seconds_median=median,
                   encoder_speedup=base_median / median, encoder_speedup_best=base_best / best,
                   macs_reduction=base_macs / row["encoder_gmacs"])

    title = (f"Whisper tiny.en, {len(references)} espeak-ng sentences, encoder timed on batch {timed.shape[0]}, "
             f"fp32, {args.threads} CPU threads, {args.rounds} timing rounds")
    print(f"\n{title}")
    print("| setting | rule | encoder GMACs | MACs reduction | encoder s/batch (median) | encoder speedup (median) | "
          "encoder speedup (best round) | WER |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {rule_name(settings[name])} | {row['encoder_gmacs']:.2f} | {row['macs_reduction']:.2f}x | "
              f"{row['encoder_seconds_median']:.3f} | {row['encoder_speedup']:.2f}x | "
              f"{row['encoder_speedup_best']:.2f}x | {row['wer']:.3f} |")
    report = {
        "title": title,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                    "torch": torch.__version__, "transformers": T.__version__},
        "references": references,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
