"""nf4kern: NF4/FP4 4-bit quantization bit-exact with bitsandbytes, with Triton kernels for QLoRA."""
from .autograd import nf4_linear
from .codebook import BLOCKSIZES, QUANT_TYPES
from .functional import dequantize_4bit, quantize_4bit
from .quant_state import QuantState

__all__ = ["BLOCKSIZES", "QUANT_TYPES", "QuantState", "dequantize_4bit", "nf4_linear", "quantize_4bit"]
__version__ = "0.1.0"
