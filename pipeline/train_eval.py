"""Rank 0's evaluations during training: the dataset's protocol on the current weights.

The first evaluation decides, once, whether the gallery stays decoded on the device
for every later one (``eval.image_cache``, ``pipeline.gallery_cache``); on a GPU the
whole evaluation then runs there in one pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.gallery_cache import GalleryCache, maybe_gallery_cache
from pipeline.vocab import Vocabulary

_UNDECIDED = object()


class TrainingEvaluator:
    """``evaluator(model, vocab)`` -> the protocol's metrics (floats) for ``config``'s
    evaluation set on ``device``; the model is back in train mode after."""

    def __init__(self, config: dict[str, Any], device: torch.device, progress: bool = False):
        self.config, self.device, self.progress = config, torch.device(device), progress
        self._cache: GalleryCache | None | object = _UNDECIDED

    def gallery_cache(self) -> GalleryCache | None:
        """The evaluation set's gallery cache, built at the first call (None: decode the
        shards at every evaluation)."""
        if self._cache is _UNDECIDED:
            from shards.manifest import default_eval, load_manifest

            data, ev = self.config["data"], self.config["eval"]
            manifest = load_manifest(data)
            split = manifest["evals"][ev["eval_set"] or default_eval(manifest)]["gallery"]
            self._cache = maybe_gallery_cache(
                ev["image_cache"],
                data,
                split,
                self.config["image"]["size"],
                self.device,
                progress=self.progress,
            )
        return self._cache  # type: ignore[return-value]

    def __call__(self, model: nn.Module, vocab: Vocabulary) -> dict[str, Any]:
        from pipeline.evaluate import evaluate_model

        image, ev = self.config["image"], self.config["eval"]
        was_training = model.training
        model.eval()
        try:
            metrics = evaluate_model(
                model,
                vocab,
                self.config["data"],
                eval_name=ev["eval_set"],
                image_size=image["size"],
                mean=image["mean"],
                std=image["std"],
                batch_size=ev["batch_size"],
                query_batch_size=ev["query_batch_size"],
                device=self.device,
                rerank_top=ev["rerank_top"],
                grid_png=ev["grid_png"],
                gallery_cache=self.gallery_cache(),
                # a GPU run trained under bf16 autocast evaluates under it too
                amp=bool(self.config["train"]["amp"]) and self.device.type == "cuda",
            )
        finally:
            model.train(was_training)
        return {k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}


def recall_line(recalls: dict[str, Any]) -> str:
    """``"R@1 12.30  R@5 40.10 ..."``: the protocol's recalls of one evaluation, for the log."""
    return "  ".join(f"{key} {value:.2f}" for key, value in recalls.items() if key.startswith("R@"))
