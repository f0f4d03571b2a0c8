"""nf4kern: NF4/FP4 4-bit quantization bit-exact with bitsandbytes, with Triton kernels for QLoRA."""
from .autograd import nf4_linear, qlora_linear
from .codebook import BLOCKSIZES, QUANT_TYPES
from .functional import NonFiniteError, dequantize_4bit, quantize_4bit
from .model import load_bnb_checkpoint, quantize_model
from .qlora import load_adapter, prepare_qlora, qlora_report, save_adapter
from .quant_state import QuantState

__all__ = [
    "BLOCKSIZES",
    "NonFiniteError",
    "QUANT_TYPES",
    "QuantState",
    "dequantize_4bit",
    "load_adapter",
    "load_bnb_checkpoint",
    "nf4_linear",
    "prepare_qlora",
    "qlora_linear",
    "qlora_report",
    "quantize_4bit",
    "quantize_model",
    "save_adapter",
]
__version__ = "0.1.0"
