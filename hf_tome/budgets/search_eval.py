"""Fast, sharded accuracy of many kept-count configurations of one classifier on a fixed set of images.

What does not change between candidates is computed once per image: the preprocessed pixels, the input of
block 0 (the embeddings) and its uncompressed output. A candidate that leaves block 0 alone then runs blocks
1..L-1 and the head only; one that compresses block 0 runs every block from the cached embeddings. For the duration
of a search block 0 is replaced by a module that replays the cached output, or runs the real block on the cached
input. Images are sharded over the processes
of an :class:`accelerate.Accelerator` with ``split_between_processes``; per-candidate sums are gathered with
``gather_for_metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_tome.config import ToMeConfig
from hf_tome.core.plan import ReductionPlan
from hf_tome.evaluation.classification import pixel_batches
from hf_tome.integration.encoder import encoder_layers
from hf_tome.integration.patch import build_plan


class _StopForward(Exception):
    """Raised by a hook once block 0 has produced what the cache needs: the rest of the forward is skipped."""


class _ReplayBlock(nn.Module):
    """Stands in for block 0: returns the cached output of the current batch, passes sizes and sources on; with
    ``run_block``, runs the real block 0 (under the plan's settings for it) on the cached input instead."""

    def __init__(self, block: nn.Module | None = None) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.run_block = False
        self._block = [block]  # a list, so the real block is not registered as a submodule twice

    def forward(self, hidden_states, attention_mask=None, size=None, positions=None, source=None, **kwargs):
        if self.run_block:
            return self._block[0](self.hidden, attention_mask, size, positions, source, **kwargs)
        return self.hidden, size, positions, source


class CachedEvaluator:
    """Accuracy and loss of configurations of ``model`` (patched, eval mode) on ``dataset`` (image, label).

    Args:
        model: a patched image classifier (its ``config.tome`` settings other than kept counts are used).
        dataset: rows with ``image`` and ``label``; this process evaluates its share of the first rows.
        image_processor: the model's processor.
        accelerator: shards images and gathers results (one process: no sharding).
        dtype: the dtype of the forward passes (the model is converted to it).
        batch_size: images per forward pass.
        keep_pixels: also keep the preprocessed pixels, to run settings end to end (:meth:`evaluate_from_pixels`).
    """

    def __init__(self, model: nn.Module, dataset, image_processor, accelerator, dtype: torch.dtype = torch.float32,
                 batch_size: int = 64, keep_pixels: bool = False) -> None:
        self.model, self.dataset, self.processor = model, dataset, image_processor
        self.accelerator, self.dtype, self.batch_size, self.keep_pixels = accelerator, dtype, batch_size, keep_pixels
        self.device = accelerator.device
        self.model.eval().to(device=self.device, dtype=dtype)
        self.base_config = ToMeConfig.from_dict(model.config.tome)
        self._hidden: dict[int, torch.Tensor] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._pixels: dict[int, torch.Tensor] = {}
        self._labels: dict[int, int] = {}
        self._reference: dict[int, torch.Tensor] = {}
        self.pixel_shape: tuple[int, ...] | None = None
        self.num_tokens: int | None = None  # tokens entering block 0, known once an image is cached
        self.set_kept(None, None)  # block 0 must be cached uncompressed, whatever the model was set to

    def local_indices(self, count: int) -> list[int]:
        """This process's share of the first ``count`` images."""
        with self.accelerator.split_between_processes(list(range(min(count, len(self.dataset))))) as local:
            return list(local)

    def cache(self, indices: Sequence[int]) -> None:
        """Preprocess and run block 0 for the images of ``indices`` not cached yet (its input and output)."""
        missing = [index for index in indices if index not in self._hidden]
        if not missing:
            return
        layers = encoder_layers(self.model)
        captured: list[torch.Tensor] = []
        inputs: list[torch.Tensor] = []

        def capture(module, args, output):
            captured.append(output[0])
            raise _StopForward

        hook = layers[0].register_forward_hook(capture)
        input_hook = layers[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        try:
            rows = self.dataset.select(missing)
            with torch.inference_mode():
                batches = pixel_batches(rows, self.processor, self.batch_size)
                for start, (pixels, labels) in zip(range(0, len(missing), self.batch_size), batches, strict=True):
                    pixels = pixels.to(device=self.device, dtype=self.dtype)
                    self.pixel_shape = tuple(pixels.shape[1:])
                    try:
                        self.model(pixel_values=pixels, tome_plan=self.plan)
                    except _StopForward:
                        pass
                    hidden, entering = captured.pop(), inputs.pop()
                    self.num_tokens = int(entering.shape[1])
                    for offset, index in enumerate(missing[start : start + len(labels)]):
                        self._hidden[index] = hidden[offset]
                        self._inputs[index] = entering[offset]
                        self._labels[index] = int(labels[offset])
                        if self.keep_pixels:
                            self._pixels[index] = pixels[offset]
        finally:
            hook.remove()
            input_hook.remove()

    def batches(self, indices: Sequence[int], block0_input: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """Cached block-0 outputs (``block0_input``: inputs) and labels of ``indices`` in batches (computing what
        is not cached yet)."""
        self.cache(indices)
        store = self._inputs if block0_input else self._hidden
        for start in range(0, len(indices), self.batch_size):
            chunk = list(indices[start : start + self.batch_size])
            hidden = torch.stack([store[index] for index in chunk])
            yield hidden, torch.tensor([self._labels[index] for index in chunk], device=self.device), chunk

    @contextmanager
    def replaying(self) -> Iterator[_ReplayBlock]:
        """Within the block, forward passes skip block 0 and read the hidden states set on the yielded module (or
        run block 0 on them: :meth:`logits_from_block0_input`)."""
        layers = encoder_layers(self.model)
        original = layers[0]
        replay = _ReplayBlock(original)
        layers[0] = replay
        try:
            yield replay
        finally:
            layers[0] = original

    def logits_from_block0(self, replay: _ReplayBlock, hidden: torch.Tensor,
                           plan: ReductionPlan | None = None) -> torch.Tensor:
        """Logits of the model run from cached block-0 outputs ``hidden`` (inside :meth:`replaying`), under ``plan``
        (default: the one :meth:`set_kept` built)."""
        return self._replayed_logits(replay, hidden, plan, run_block=False)

    def logits_from_block0_input(self, replay: _ReplayBlock, hidden: torch.Tensor,
                                 plan: ReductionPlan | None = None) -> torch.Tensor:
        """Logits of the model run from cached block-0 *inputs* ``hidden`` (inside :meth:`replaying`): every block
        runs, block 0 under the plan too, so the plan may compress it."""
        return self._replayed_logits(replay, hidden, plan, run_block=True)

    def _replayed_logits(self, replay: _ReplayBlock, hidden: torch.Tensor, plan: ReductionPlan | None,
                         run_block: bool) -> torch.Tensor:
        """The model's logits with block 0 standing in for the cached ``hidden`` (its output, or with
        ``run_block`` its input)."""
        replay.hidden, replay.run_block = hidden, run_block
        try:
            # Block 0's input or output is replayed, so the pixels only need the right shape (embedding is cheap).
            pixels = torch.zeros(hidden.shape[0], *self.pixel_shape, device=self.device, dtype=self.dtype)
            return self.model(pixel_values=pixels, tome_plan=plan or self.plan).logits
        finally:
            replay.run_block = False

    def compresses_block0(self, config: tuple) -> bool:
        """True when a configuration ``(prune_kept, merge_kept[, merge_match])`` reduces the tokens of block 0, so
        it cannot start from block 0's cached output (call after :meth:`cache`)."""
        return self.num_tokens is not None and min(config[0][0], config[1][0]) < self.num_tokens

    def _logits(self, replay: _ReplayBlock, indices: Sequence[int], config: tuple
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """Logits, labels and indices per batch of ``config`` (already set) from the cheapest cache that holds."""
        from_input = self.compresses_block0(config)
        for hidden, labels, chunk in self.batches(indices, block0_input=from_input):
            if from_input:
                yield self.logits_from_block0_input(replay, hidden), labels, chunk
            else:
                yield self.logits_from_block0(replay, hidden), labels, chunk

    def set_kept(self, prune_kept: Sequence[int] | None, merge_kept: Sequence[int] | None, r: int = 0,
                 merge_match: str = "class_attention", merge_rule: str | None = None,
                 merge_mode: str | None = None, prune_matched_layers: int | None = None) -> None:
        """Run the next forward passes with this configuration: its plan, built once and handed to each forward.

        ``merge_rule``/``merge_mode``/``prune_matched_layers`` None keep the base configuration's (the model's saved
        ones).
        """
        base = self.base_config
        config = base.replace(r=r, budget=None, budget_table=None, merge_match=merge_match,
                              prune_kept=list(prune_kept) if prune_kept is not None else None,
                              merge_kept=list(merge_kept) if merge_kept is not None else None,
                              **base.merging(merge_rule=merge_rule, merge_mode=merge_mode,
                                             prune_matched_layers=prune_matched_layers))
        self.plan = build_plan(self.model, config)

    def evaluate(self, configs: Sequence[tuple], count: int,
                 description: str = "candidates", fidelity: bool = False) -> torch.Tensor:
        """Sums ``[correct, summed NLL, images, summed KL]`` per configuration [len(configs), 4] over all processes.

        A configuration is ``(prune_kept, merge_kept)`` or ``(prune_kept, merge_kept, merge_match)``.

        Every process evaluates its share of the first ``count`` images; block 0 is replayed from the cache (its
        output, or its input for configurations that compress it).
        With ``fidelity``, the last column sums KL(uncompressed model || configuration) over the images: it
        measures the damage directly, so it ranks candidates far less noisily than labels on a few images.
        """
        indices = self.local_indices(count)
        self.cache(indices)
        totals = torch.zeros(len(configs), 4, dtype=torch.float64, device=self.device)
        progress = tqdm(configs, desc=description, unit="cfg", disable=not self.accelerator.is_main_process)
        with torch.inference_mode(), self.replaying() as replay:
            if fidelity:
                self._cache_reference(replay, indices)
            for number, kept in enumerate(progress):
                self.set_kept(*kept[:2], merge_match=kept[2] if len(kept) > 2 else "class_attention")
                for logits, labels, chunk in self._logits(replay, indices, kept):
                    totals[number, :3] += _scores(logits, labels)
                    if fidelity:
                        reference = torch.stack([self._reference[index] for index in chunk])
                        log_probs = logits.float().log_softmax(dim=-1)
                        totals[number, 3] += (reference.exp() * (reference - log_probs)).sum().double()
        self.set_kept(None, None)
        return self._gather(totals)

    def seconds_per_image(self, configs: Sequence[tuple], count: int) -> float:
        """Forward seconds per image of ``configs`` run as :meth:`evaluate` runs them (from block 0's cache), for the
        run-time estimate of a search: one pass of a batch of this process's share of the first ``count`` images
        per configuration, after one untimed warm-up pass; the mean over ``configs``. 0 without images."""
        indices = self.local_indices(count)[: self.batch_size]
        if not indices or not configs:
            return 0.0
        self.cache(indices)
        seconds = []
        with torch.inference_mode(), self.replaying() as replay:
            for number, kept in enumerate([configs[0], *configs]):
                self.set_kept(*kept[:2], merge_match=kept[2] if len(kept) > 2 else "class_attention")
                begin = time.perf_counter()
                logits, _, _ = next(self._logits(replay, indices, kept))
                float(logits[0, 0])  # reading a value waits for the device
                if number:
                    seconds.append(time.perf_counter() - begin)
        self.set_kept(None, None)
        return sum(seconds) / len(seconds) / len(indices)

    def _cache_reference(self, replay: _ReplayBlock, indices: Sequence[int]) -> None:
        """Log-probabilities of the uncompressed model for ``indices`` (inside :meth:`replaying`)."""
        missing = [index for index in indices if index not in self._reference]
        self.set_kept(None, None)
        for hidden, _, chunk in self.batches(missing):
            log_probs = self.logits_from_block0(replay, hidden).float().log_softmax(dim=-1)
            self._reference.update(zip(chunk, log_probs, strict=True))

    def evaluate_merging(self, r_values: Sequence[int], count: int, description: str = "ToMe") -> torch.Tensor:
        """Like :meth:`evaluate` for constant-r ToMe, which merges in block 0 too (so runs from the pixels)."""
        return self.evaluate_from_pixels([{"r": r} for r in r_values], count, description)

    def evaluate_from_pixels(self, settings: Sequence[dict], count: int, description: str = "settings",
                             timings: list[float] | None = None) -> torch.Tensor:
        """Sums like :meth:`evaluate` for settings ``{"r"}`` or ``{"prune_kept", "merge_kept"[, "merge_match"]}``,
        each optionally with ``"merge_rule"``/``"merge_mode"``/``"prune_matched_layers"`` (default: the base
        configuration's), run end to end.

        Nothing is replayed: every forward pass starts from the cached pixels. ``timings`` (if given) receives
        the forward seconds of this process per setting.
        """
        if not self.keep_pixels:
            raise ValueError("evaluating from pixels needs them: expected a CachedEvaluator with keep_pixels=True")
        indices = self.local_indices(count)
        self.cache(indices)
        totals = torch.zeros(len(settings), 3, dtype=torch.float64, device=self.device)
        progress = tqdm(settings, desc=description, unit="cfg", disable=not self.accelerator.is_main_process)
        with torch.inference_mode():
            for number, setting in enumerate(progress):
                self.set_kept(setting.get("prune_kept"), setting.get("merge_kept"), r=setting.get("r", 0),
                              merge_match=setting.get("merge_match", "class_attention"),
                              merge_rule=setting.get("merge_rule"), merge_mode=setting.get("merge_mode"),
                              prune_matched_layers=setting.get("prune_matched_layers"))
                seconds = 0.0
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    pixels = torch.stack([self._pixels[index] for index in chunk])
                    labels = torch.tensor([self._labels[index] for index in chunk], device=self.device)
                    begin = time.perf_counter()
                    logits = self.model(pixel_values=pixels, tome_plan=self.plan).logits
                    seconds += time.perf_counter() - begin
                    totals[number] += _scores(logits, labels)
                if timings is not None:
                    timings.append(seconds)
        self.set_kept(None, None)
        return self._gather(totals)

    def _gather(self, totals: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(totals[None]).reshape(-1, *totals.shape).sum(dim=0).cpu()


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[correct, summed NLL, count]`` of one batch (float64)."""
    logits = logits.float()
    nll = nn.functional.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(dim=-1) == labels).sum()
    return torch.stack([correct.double(), nll.double(), torch.tensor(float(len(labels)), dtype=torch.float64,
                                                                      device=logits.device)])
