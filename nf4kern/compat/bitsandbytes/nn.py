"""bitsandbytes.nn's 4-bit classes: nf4kern's own, which follow bitsandbytes' constructors,
attributes and state dict layout."""
from nf4kern.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4", "Params4bit"]
