"""Other libraries' APIs served by nf4kern, for code written against them.

    import nf4kern.compat.bitsandbytes as bnb   # bitsandbytes' 4-bit API
"""
