"""The embedded default model's two builds compared in bf16 on Fashion-MNIST test images.

Old build: the converted DINOv2-S config says 518 px (37x37 position grid interpolated to 16x16 at every 224 px
forward), with a head fitted on its bf16 features of the same 2,000 training images. New build (the current
default model): the grid resampled once and the config saying 224 px. Reports each build's accuracy unmerged and
at r=14 / r=21, how many predictions differ, and the same with one shared head (isolating the grid's rounding).

    python benchmarks/default_model_builds.py            # first 1,000 test images
    python benchmarks/default_model_builds.py 10000 --out benchmarks/results/default_model_builds.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, Dinov2ForImageClassification

import hf_tome
from hf_tome.evaluation.assets.default_model import _balanced_subset, _quiet_transformers, default_model_path
from hf_tome.evaluation.assets.dinov2 import dinov2_small_path
from hf_tome.evaluation.assets.fashion_mnist import FASHION_MNIST_LABELS, load_fashion_mnist
from hf_tome.evaluation.classification import fit_linear_head, pooled_features, preprocess_all, resolve_dtype

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("n_test", type=int, nargs="?", default=1000, help="test images compared")
parser.add_argument("--out", type=Path, default=Path("benchmarks/results/default_model_builds.json"))
args = parser.parse_args()
N_TEST = args.n_test
t0 = time.time()
dtype = resolve_dtype("auto")
print("dtype", dtype, "threads", torch.get_num_threads(), flush=True)
new_path = default_model_path()  # builds the 2,000-image default model with the new code (bf16 features)
print("built/loaded new default model", new_path, round(time.time() - t0), "s", flush=True)
print(open(new_path / "default_model.json").read(), flush=True)
new = Dinov2ForImageClassification.from_pretrained(new_path).eval()
processor = AutoImageProcessor.from_pretrained(new_path)
labels = list(FASHION_MNIST_LABELS)
with _quiet_transformers():
    old = Dinov2ForImageClassification.from_pretrained(
        str(dinov2_small_path()), num_labels=10, id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}).eval()
assert old.config.image_size == 518 and new.config.image_size == 224
# The old build: head fitted on the 518-config backbone's bf16 features of the same 2,000 images.
train = _balanced_subset(load_fashion_mnist("train"), 2000)
feats, targets = pooled_features(old.dinov2, train, AutoImageProcessor.from_pretrained(str(dinov2_small_path())),
                                 64, dtype, description="old features")
head = fit_linear_head(feats, targets, 10)
old.classifier.load_state_dict(head.state_dict())
with torch.no_grad():
    old_train_acc = float((head(feats).argmax(-1) == targets).float().mean())
print("old head train acc", old_train_acc, "new", json.load(open(new_path / "default_model.json"))["train_accuracy"],
      round(time.time() - t0), "s", flush=True)
# Same-head model: old backbone (518 config) with the new head, isolates the position-embedding rounding.
with _quiet_transformers():
    cross = Dinov2ForImageClassification.from_pretrained(str(dinov2_small_path()), num_labels=10).eval()
cross.classifier.load_state_dict(new.classifier.state_dict())

test = load_fashion_mnist("test", limit=N_TEST)
batches = preprocess_all(test, processor, 64, dtype)
y = torch.cat([b[1] for b in batches])



def predict(model, r):
    if r:
        hf_tome.apply(model, hf_tome.ToMeConfig(r=r))
    model.to(dtype)
    out = []
    with torch.inference_mode():
        for px, _ in batches:
            out.append(model(pixel_values=px).logits.float())
    model.to(torch.float32)
    if r:
        hf_tome.remove(model)
    return torch.cat(out)


results = {"dtype": str(dtype), "n_test": N_TEST, "old_train_acc": old_train_acc}
for r in (0, 14, 21):
    models = {"old": old, "new": new} | ({"same_head_old_grid": cross} if r == 0 else {})
    logits = {}
    for name, model in models.items():
        ts = time.time()
        logits[name] = predict(model, r)
        print(f"r={r} {name}: acc {float((logits[name].argmax(-1) == y).float().mean()):.4f} "
              f"({time.time() - ts:.0f} s)", flush=True)
    row = {name: float((lg.argmax(-1) == y).float().mean()) for name, lg in logits.items()}
    row["pred_diff_old_vs_new"] = int((logits["old"].argmax(-1) != logits["new"].argmax(-1)).sum())
    row["max_logit_diff_old_vs_new"] = float((logits["old"] - logits["new"]).abs().max())
    if "same_head_old_grid" in logits:
        row["pred_diff_same_head"] = int((logits["same_head_old_grid"].argmax(-1) != logits["new"].argmax(-1)).sum())
        row["max_logit_diff_same_head"] = float((logits["same_head_old_grid"] - logits["new"]).abs().max())
    results[f"r={r}"] = row
    print(json.dumps(row), flush=True)
print(json.dumps(results, indent=1))
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(results, indent=1) + "\n")
print("total", round(time.time() - t0), "s")
