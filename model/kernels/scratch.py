"""Work memory the kernels' Python side hands to native calls.

Rule: nothing is allocated per call: each buffer is one per thread (`threading.local`, so two
engines in two threads never share one), grown when a call needs more and kept. A buffer is
only used between a native call's start and its return, never held across calls.
"""
from __future__ import annotations

import threading

import torch


class Scratch(threading.local):
    """A reusable byte buffer per thread."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        return self.buf


q8_activations = Scratch()  # activations rounded to Q8_0 blocks
x4_corrections = Scratch()  # their per-block corrections (x4 products)
gate_values = Scratch()     # sparse ReGLU: gate values, and the active rows' coefficients
active_rows = Scratch()     # sparse ReGLU: active row indices (int32)
expert_out = Scratch()      # an expert's output (or its work memory) before it is added into the residual
moe_batch_work = Scratch()  # st_moe_batch's work memory, shared by every layer
