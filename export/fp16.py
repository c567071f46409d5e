"""FP32 -> mixed-precision FP16 ONNX conversion for strongly typed TensorRT networks.

TensorRT 11 removed the FP16 builder flag: a network's precision is the precision of its
ONNX tensors. ``convert_to_fp16`` stores weights and activations in float16 and inserts
Casts so that graph inputs and outputs stay float32 (``keep_io_types``: callers, the parity
check and the gallery index keep their float32 arrays). Ops whose float16 result loses too
much (norms and reductions of squares that overflow 65504, exponentials) stay float32.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
from onnxconverter_common import float16

# On top of onnxconverter-common's defaults: L2 normalisation (ReduceL2, or Pow + ReduceSum +
# Sqrt) of features that can reach 1e2 overflows float16 when squared and summed over D.
FP32_OPS = sorted(
    set(float16.DEFAULT_OP_BLOCK_LIST)
    | {
        "ReduceL2",
        "ReduceSumSquare",
        "LpNormalization",
        "Pow",
        "Sqrt",
        "Softmax",
        "LogSoftmax",
        "Exp",
    }
)


def convert_model_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Mixed-precision copy of ``model``: float16 inside, float32 graph inputs/outputs."""
    with warnings.catch_warnings():
        # it warns for every weight below float16's smallest normal value that it clamps
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=FP32_OPS, disable_shape_infer=False
        )
    onnx.checker.check_model(converted)
    return converted


def convert_to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Convert the ONNX file ``src`` and write it to ``dst`` (returned)."""
    model = onnx.load(str(src))
    converted = convert_model_to_fp16(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(dst))
    return dst
