"""NF4 (4-bit NormalFloat) weights in bitsandbytes' layout: format, reference, native kernels, ops."""
