"""Input validation shared by every model: clear errors that name the argument.

Shape checks are static (they read ``dim()`` and fixed sizes) and always run.
Checks that read tensor *values* (token ids, lengths) or dynamic sizes are skipped
while a graph is being traced or compiled, so the same code path exports to ONNX, and
while a CUDA graph is being captured: reading a value back is a host sync, which
invalidates the capture (the training step's graph and serving's query graphs).
"""

from __future__ import annotations

import torch

MIN_IMAGE_SIZE = 32


def is_tracing() -> bool:
    """True while torch.jit/ONNX tracing or torch.compile is capturing a graph, or the
    current CUDA stream is capturing a CUDA graph."""
    return bool(
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
        or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())
    )


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """``images`` must be a float (B, 3, H, W) tensor with H, W >= 32."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(
            f"{name} must have 3 channels (B, 3, H, W), got {images.shape[1]} "
            f"channels in shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (ImageNet-normalised), got {images.dtype}")
    if is_tracing():
        return
    if images.shape[0] < 1:
        raise ValueError(f"{name} is an empty batch, shape {tuple(images.shape)}")
    if min(images.shape[2], images.shape[3]) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"{name} must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels, "
            f"got {images.shape[2]}x{images.shape[3]}"
        )


def check_text(tokens: torch.Tensor, lengths: torch.Tensor, vocab_size: int) -> None:
    """``tokens`` (B, T) integer ids in [0, vocab_size); ``lengths`` (B,) in [1, T]."""
    for name, value in (("tokens", tokens), ("lengths", lengths)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.is_floating_point() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (int64), got {value.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, T), got shape {tuple(tokens.shape)}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must have shape (B,), got shape {tuple(lengths.shape)}")
    if is_tracing():
        return
    if tokens.shape[0] != lengths.shape[0]:
        raise ValueError(
            f"tokens and lengths batch sizes differ: tokens has {tokens.shape[0]} "
            f"rows, lengths has {lengths.shape[0]}"
        )
    if tokens.shape[1] < 1:
        raise ValueError(f"tokens must have at least one step, got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"tokens must be ids in [0, {vocab_size}) (vocab_size={vocab_size}), "
            f"got min {int(tokens.min())}, max {int(tokens.max())}"
        )
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > tokens.shape[1]):
        raise ValueError(
            f"lengths must be in [1, T={tokens.shape[1]}] (an empty text is one "
            f"<unk> token), got min {int(lengths.min())}, max {int(lengths.max())}"
        )


def check_same_batch(**tensors: torch.Tensor | None) -> None:
    """Every named tensor has the same leading (batch) size (``None`` entries are skipped:
    export graphs pass ``None`` for representation parts a step does not read)."""
    if is_tracing():
        return
    sizes = {name: int(t.shape[0]) for name, t in tensors.items() if t is not None}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(f"batch sizes must match, got {detail}")


def check_repr(value: tuple, names: tuple[str, ...], argument: str) -> None:
    """A representation tuple has one tensor per declared name."""
    if not isinstance(value, (tuple, list)) or len(value) != len(names):
        got = len(value) if isinstance(value, (tuple, list)) else type(value).__name__
        raise ValueError(f"{argument} must be a tuple of {len(names)} tensors {names}, got {got}")
