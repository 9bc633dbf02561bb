"""What ``hf-tome search`` leaves behind: the model with its budget table, ``search.json``, ``search.png`` and
the markdown table it prints."""

from __future__ import annotations

import json
from pathlib import Path

from hf_tome.budgets.options import SearchOptions
from hf_tome.config import ToMeConfig


def write_outputs(options: SearchOptions, model_name: str, table_config: ToMeConfig, payload: dict) -> None:
    """Write what a finished search produced: the model with its budget table (``payload["saved_model"]``; with
    ``options.in_place`` also the table into ``model_name``'s own config), ``search.json`` and ``search.png`` in
    ``options.out``; print the table."""
    from transformers import AutoImageProcessor

    from hf_tome.integration.loading import AutoModelForImageClassification

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dir = Path(payload["saved_model"])
    # Reload instead of saving the searched model: it was cast to the search dtype, which would lose precision.
    fresh = AutoModelForImageClassification.from_pretrained(model_name, tome_config=table_config)
    fresh.save_pretrained(save_dir)
    AutoImageProcessor.from_pretrained(model_name).save_pretrained(save_dir)
    if options.in_place:
        config_path = Path(model_name) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--in-place needs a local model folder: {model_name!r} has no config.json")
        data = json.loads(config_path.read_text())
        data["tome"] = table_config.to_dict()
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        payload["updated_in_place"] = str(config_path)
    (out / "search.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot_search(payload, out / "search.png")
    print(format_rows(payload))
    print(f"search: {payload['search_seconds']:.0f} s searching, {payload['total_seconds']:.0f} s in all; wrote "
          f"{out / 'search.json'}, {out / 'search.png'} and the model with its budget table in {save_dir}")


def format_rows(payload: dict) -> str:
    """Markdown table of the budget table and the ToMe baseline."""
    lines = ["| setting | GMACs | fraction | val. accuracy | merge match | origin | tokens leaving each layer |",
             "|---|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        name = "full" if row["fraction"] >= 0.999 else f"searched @{row.get('target')}"
        lines.append(f"| {name} | {row['gflops']:.3f} | {row['fraction']:.3f} | {100 * row['accuracy']:.2f}% | "
                     f"{row.get('merge_match', 'class_attention')} | {row.get('origin', '')} | {row['merge_kept']} |")
    for row in payload["tome_baseline"]:
        lines.append(f"| ToMe r={row['r']} | {row['gflops']:.3f} | {row['fraction']:.3f} | "
                     f"{100 * row['accuracy']:.2f}% | bipartite | | |")
    return "\n".join(lines)


def plot_search(payload: dict, path: Path) -> None:
    """Accuracy against GMACs: the searched rows against constant-r ToMe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    rows = payload["rows"]
    axis.plot([r["gflops"] for r in rows], [100 * r["accuracy"] for r in rows], "o-",
              label=f"prune + merge, {payload['method']} search")
    if payload["tome_baseline"]:
        tome = sorted(payload["tome_baseline"], key=lambda r: r["gflops"])
        axis.plot([r["gflops"] for r in tome], [100 * r["accuracy"] for r in tome], "s--", label="ToMe, constant r")
        for row in tome:
            axis.annotate(f"r={row['r']}", (row["gflops"], 100 * row["accuracy"]), textcoords="offset points",
                          xytext=(4, -10), fontsize=8)
    axis.set_xlabel("GMACs per image")
    axis.set_ylabel("validation accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"{Path(payload['model']).name}: budget table", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
