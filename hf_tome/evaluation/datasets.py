"""Loading the images a job evaluates on: the packaged Fashion-MNIST, a saved dataset, an image folder or a Hub id."""

from __future__ import annotations

from pathlib import Path


def load_eval_dataset(name: str, split: str, limit: int | None, columns: tuple[str, ...] = ("image", "label")):
    """``fashion-mnist``, a ``save_to_disk`` folder, a folder of image files, or a Hub dataset id, cut to ``limit``
    rows; raises ``ValueError`` when ``columns`` are missing."""
    if name == "fashion-mnist":
        from hf_tome.evaluation.assets.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(split, limit=limit)
    import datasets

    folder = Path(name)
    saved_markers = ("dataset_info.json", "dataset_dict.json", "state.json")
    if folder.is_dir() and not any((folder / marker).exists() for marker in saved_markers):
        dataset = datasets.load_dataset("imagefolder", data_dir=name, split="train")  # plain image files
    elif folder.is_dir():
        loaded = datasets.load_from_disk(name)
        dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        dataset = datasets.load_dataset(name, split=split)
    missing = set(columns) - set(dataset.column_names)
    if missing:
        raise ValueError(f"dataset {name!r} lacks column(s) {sorted(missing)}: expected "
                         f"{' and '.join(repr(column) for column in columns)}, found {dataset.column_names}")
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset
