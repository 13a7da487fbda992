"""What identifies tensors' values now, for the caches of values derived from them (DoRA's norms,
an INT4 weight's native view, a layer's stacked adapters, a GPTQ layer's INT4 import)."""

from __future__ import annotations


def stamp(*tensors):
    """Each tensor's storage address, version counter (bumped by every in-place op), dtype, shape
    and strides; None when one of them has no version counter (a tensor made under
    ``torch.inference_mode()``, which can change in place unseen), and then nothing may be cached.
    Callers compare identities themselves: an address can be reused by a later tensor."""
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride()) for t in tensors)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
