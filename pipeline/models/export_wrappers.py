"""The exportable graphs of a model: one ``nn.Module`` per serving step, with input and
output names, example inputs and dynamic axes (what ``export/`` turns into ONNX).

``graph_modules(model, image_size)`` returns, in serving order:

==============  ==========================================  =============================
name            inputs                                      outputs
==============  ==========================================  =============================
image_encoder   images (B, 3, S, S) float                   repr_<n> for n in image_repr_names
text_encoder    tokens (B, T) int64, lengths (B,) int64     text_<n> for n in text_repr_names
composer        repr_<n>..., text_<n>...                    query (B, D)
target_head     repr_<n>...                                 target (B, D)
correction      ref_<n>..., cand_<n>..., text_<n>...        score (B,)
==============  ==========================================  =============================

These are the names the ONNX files, ``artifacts.json``, the TensorRT engines and the
runtime (``export.runtime``) all use: ``<role>_<repr name>`` (``graph_tensor_names``).

``composer``, ``target_head`` and ``correction`` take only the representation parts they
read (``GraphModule.input_names`` lists them; e.g. ``text_only``'s composer reads no image
part). ``text_encoder`` is absent when the model reads no text (``text_repr_names == ()``,
``image_only``); ``correction`` is present only when ``model.has_correction``. Axis 0 is
the dynamic ``batch`` everywhere; a text-representation axis that grows with T is the
dynamic ``length``. The image size S is fixed per export (feature-map shapes follow it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from pipeline.models.base import ComposedRetrievalModel

ONNX_OPSET = 17  # the one opset of every export (TorchScript exporter, see export_graph)


def graph_tensor_names(role: str, names) -> list[str]:
    """Graph tensor names of representation parts: ``<role>_<name>`` (roles ``repr``,
    ``text``, and ``ref``/``cand`` in the correction graph)."""
    return [f"{role}_{name}" for name in names]


class GraphModule(NamedTuple):
    """One exportable graph; ``example_inputs(batch, text_len)`` builds its inputs."""

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example_inputs: Callable[[int, int], tuple[torch.Tensor, ...]]
    dynamic_axes: dict[str, dict[int, str]]


class ImageEncoderGraph(nn.Module):
    """images (B, 3, S, S) -> image representation tuple."""

    def __init__(self, model: ComposedRetrievalModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.encode_image(images))


class TextEncoderGraph(nn.Module):
    """tokens (B, T), lengths (B,) -> text representation tuple."""

    def __init__(self, model: ComposedRetrievalModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.encode_text(tokens, lengths))


def _expand(inputs: tuple[torch.Tensor, ...], read: list[bool]) -> list[torch.Tensor | None]:
    """Put the graph's inputs back into their full-signature slots (None where unread)."""
    values = iter(inputs)
    return [next(values) if r else None for r in read]


class ComposerGraph(nn.Module):
    """(*image_repr, *text_repr) -> query (B, D). Only the parts ``compose`` reads are
    inputs (``read`` masks the full list): ONNX drops unused inputs, so the graph's
    declared names must match the ones it keeps."""

    def __init__(self, model: ComposedRetrievalModel, read: list[bool]):
        super().__init__()
        self.model = model
        self.read = read
        self.n_image = len(model.image_repr_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        full, n = _expand(inputs, self.read), self.n_image
        return self.model.compose(tuple(full[:n]), tuple(full[n:]))


class TargetHeadGraph(nn.Module):
    """(*image_repr) -> target (B, D) (only the parts ``embed_target`` reads)."""

    def __init__(self, model: ComposedRetrievalModel, read: list[bool]):
        super().__init__()
        self.model = model
        self.read = read

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embed_target(tuple(_expand(inputs, self.read)))


class CorrectionGraph(nn.Module):
    """(*ref_repr, *cand_repr, *text_repr) -> correction logit (B,) (only the parts
    ``correct`` reads)."""

    def __init__(self, model: ComposedRetrievalModel, read: list[bool]):
        super().__init__()
        self.model = model
        self.read = read
        self.n_image = len(model.image_repr_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        full, n = _expand(inputs, self.read), self.n_image
        return self.model.correct(tuple(full[:n]), tuple(full[n : 2 * n]), tuple(full[2 * n :]))


def inputs_read(
    graph_cls: type[nn.Module], model: ComposedRetrievalModel, inputs: tuple[torch.Tensor, ...]
) -> list[bool]:
    """Which of ``inputs`` the step behind ``graph_cls`` depends on (autograd reachability;
    integer inputs such as lengths count as read)."""
    probe = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in inputs)
    with torch.enable_grad():
        out = graph_cls(model, [True] * len(inputs))(*probe)
        floats = [x for x in probe if x.requires_grad]
        grads = iter(torch.autograd.grad(out.sum(), floats, allow_unused=True) if floats else [])
    return [next(grads) is not None if x.requires_grad else True for x in probe]


def example_text(
    vocab_size: int, batch: int, text_len: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens (B, T) in [2, vocab) and lengths (B,) in [1, T], one of them T."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(min(2, vocab_size - 1), vocab_size, (batch, text_len), generator=gen)
    lengths = torch.randint(1, text_len + 1, (batch,), generator=gen)
    lengths[0] = text_len
    return tokens, lengths


def example_images(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=gen)


def graph_modules(model: ComposedRetrievalModel, image_size: int = 224) -> dict[str, GraphModule]:
    """The model's exportable graphs (see module docstring). Put the model in eval() first."""
    image_names = graph_tensor_names("repr", model.image_repr_names)
    text_names = graph_tensor_names("text", model.text_repr_names)
    vocab_size = model.vocab_size

    @torch.no_grad()
    def image_repr(batch: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
        return tuple(model.encode_image(example_images(batch, image_size, seed)))

    @torch.no_grad()
    def text_repr(batch: int, text_len: int) -> tuple[torch.Tensor, ...]:
        return tuple(model.encode_text(*example_text(vocab_size, batch, text_len)))

    # which text-representation axes follow T (e.g. per-word embeddings)
    short, long = text_repr(1, 2), text_repr(1, 3)
    text_axes = {
        name: {0: "batch", **{a: "length" for a in range(1, s.dim()) if s.shape[a] != t.shape[a]}}
        for name, s, t in zip(text_names, short, long)
    }

    def batch_axes(names: list[str]) -> dict[str, dict[int, str]]:
        return {n: {0: "batch"} for n in names}

    graphs = {
        "image_encoder": GraphModule(
            ImageEncoderGraph(model),
            ["images"],
            image_names,
            lambda b, t: (example_images(b, image_size),),
            batch_axes(["images", *image_names]),
        ),
    }
    if text_names:
        graphs["text_encoder"] = GraphModule(
            TextEncoderGraph(model),
            ["tokens", "lengths"],
            text_names,
            lambda b, t: example_text(vocab_size, b, t),
            {"tokens": {0: "batch", 1: "length"}, "lengths": {0: "batch"}, **text_axes},
        )

    def step(
        name: str,
        graph_cls: type[nn.Module],
        names: list[str],
        output: str,
        make_inputs: Callable[[int, int], tuple[torch.Tensor, ...]],
        axes: dict[str, dict[int, str]],
    ) -> None:
        read = inputs_read(graph_cls, model, make_inputs(2, 3))
        kept = [n for n, r in zip(names, read) if r]
        graphs[name] = GraphModule(
            graph_cls(model, read),
            kept,
            [output],
            lambda b, t: tuple(x for x, r in zip(make_inputs(b, t), read) if r),
            {n: a for n, a in {**axes, output: {0: "batch"}}.items() if n in kept or n == output},
        )

    step(
        "composer",
        ComposerGraph,
        image_names + text_names,
        "query",
        lambda b, t: image_repr(b) + text_repr(b, t),
        {**batch_axes(image_names), **text_axes},
    )
    step(
        "target_head",
        TargetHeadGraph,
        image_names,
        "target",
        lambda b, t: image_repr(b),
        batch_axes(image_names),
    )
    if model.has_correction:
        ref = graph_tensor_names("ref", model.image_repr_names)
        cand = graph_tensor_names("cand", model.image_repr_names)
        step(
            "correction",
            CorrectionGraph,
            ref + cand + text_names,
            "score",
            lambda b, t: image_repr(b, 1) + image_repr(b, 2) + text_repr(b, t),
            {**batch_axes(ref + cand), **text_axes},
        )
    return graphs


def export_graph(
    graph: GraphModule, path: str | Path, batch: int = 2, text_len: int = 4, opset: int = ONNX_OPSET
) -> Path:
    """Write ``graph`` as ONNX to ``path`` with the TorchScript exporter (``dynamo=False``:
    it handles nn.LSTM and dynamic axes reliably at opset 17)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = graph.example_inputs(batch, text_len)
    graph.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notes
        torch.onnx.export(
            graph.module,
            inputs,
            str(path),
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_axes=graph.dynamic_axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    return path
