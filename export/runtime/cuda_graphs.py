"""CUDA graphs for the torch backend: capture a function of tensors once per input
shape bucket and replay it (one launch instead of hundreds of small kernels).

A batch is padded up to its bucket with copies of its first row (valid inputs, so no
NaN in padded rows), copied into the graph's static inputs and replayed; callers copy
the static outputs, which the next replay overwrites.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_BUCKETS = (8, 16, 32, 64)


def bucket(size: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket >= size, or None when size is larger than every bucket."""
    return next((b for b in buckets if b >= size), None)


class CapturedGraph:
    """``fn`` captured as one CUDA graph at fixed input shapes.

    Calling it copies the inputs into the graph's static inputs, replays the graph and
    returns its static outputs (overwritten by the next replay: callers copy them).
    All graphs of a backend share one memory pool; they replay one at a time.
    """

    def __init__(self, fn: Callable, example_inputs: list[torch.Tensor], pool, cudnn: bool = True):
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=cudnn):
            self.static_inputs = [x.clone() for x in example_inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (cuDNN autotuning, lazy inits) off-graph
                for _ in range(3):
                    fn(*self.static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.static_outputs = fn(*self.static_inputs)

    @classmethod
    def try_capture(
        cls, fn: Callable, example_inputs: list[torch.Tensor], pool, key: tuple, cudnn: bool = True
    ) -> CapturedGraph | None:
        """The captured graph, or None (logged) when ``fn`` cannot be captured."""
        try:
            graph = cls(fn, example_inputs, pool, cudnn=cudnn)
        except RuntimeError as err:  # an op that cannot be captured: fall back to eager
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            log.warning(
                "CUDA graph capture of %s failed (%s); it and every bucket not yet captured "
                "run eagerly",
                key,
                first_line,
            )
            return None
        log.info("captured CUDA graph %s", key)
        return graph

    def __call__(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            for static, value in zip(self.static_inputs, inputs):
                static.copy_(value)
            self.graph.replay()
        return self.static_outputs


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad dim 0 to ``size`` with copies of row 0 (valid inputs: no NaN in padded rows)."""
    if len(x) == size:
        return x
    return torch.cat([x, x[:1].expand(size - len(x), *x.shape[1:])], dim=0)
