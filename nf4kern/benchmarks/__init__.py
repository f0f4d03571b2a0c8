"""Microbenchmarks against bitsandbytes and torch, as markdown tables: `nf4kern bench` runs them
on the device at hand; bench/*.py run them for docs/benchmarks.md.

    quant   quantize / dequantize
    matmul  the NF4 linear, forward and forward + backward
    lora    the QLoRA linear layer, forward + backward
"""
BENCHMARKS = ("quant", "matmul", "lora")
