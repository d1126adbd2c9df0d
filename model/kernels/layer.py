"""One decoder layer's single-token step in native code (`layer.c`): the fast path that
`model.model.Block` takes for decode when its matrices are Q4_0 on the `c` backend.

Rule: the same math as `Block.route` + `Block.attention` + the post-attention norm (+ the
resident experts, `moe`), in native calls per layer: route, then attention, so the router's
choice still reaches the expert store before attention runs. When every expert of the layer
stays resident for good (`bind_experts`), nothing needs to run between them, and `decode` does
the whole layer in one call (`st_layer_decode`, the same bits). Weight pointers are fixed here
once, and the per-call buffers (router ids and weights, the experts' input row, work memory)
are allocated once per layer.
"""
from __future__ import annotations

import ctypes

import torch

from model.kernels import scratch
from model.kernels.build import native
from model.kernels.experts import DenseReGLUExpert
from model.kernels.matrix import Q4Matrix


class _Layer(ctypes.Structure):
    """Mirror of `st_layer` in layer.c."""

    _fields_ = [
        ("d", ctypes.c_int64), ("n_heads", ctypes.c_int64), ("n_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("router", ctypes.c_void_p),
        ("n_experts", ctypes.c_int64), ("top_k", ctypes.c_int64), ("softmax", ctypes.c_int64),
        ("qkv", ctypes.c_void_p), ("o", ctypes.c_void_p),
    ]


class NativeLayer:
    """`route(h)` and `attend(h, ...)` for one layer and one token (see layer.c for the math)."""

    def __init__(self, cfg, input_norm: torch.Tensor, post_norm: torch.Tensor, router: torch.Tensor,
                 qkv: Q4Matrix, o: Q4Matrix):
        self._keep = [t.to(torch.float32).contiguous() for t in (input_norm, post_norm, router)]
        norm_in, norm_post, router32 = self._keep
        self._lib = native()
        self._layer = _Layer(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
            cfg.head_dim ** -0.5, norm_in.data_ptr(), norm_post.data_ptr(), router32.data_ptr(),
            cfg.moe_num_primary_experts, cfg.moe_num_active_primary_experts,
            int(cfg.moe_primary_router_apply_softmax), qkv.blocks.data_ptr(), o.blocks.data_ptr(),
        )
        self._qkv, self._o = qkv, o  # the weight pointers above stay valid while these live
        self._ref = ctypes.byref(self._layer)
        self._ids = (ctypes.c_int32 * cfg.moe_num_active_primary_experts)()
        self._weights = (ctypes.c_float * cfg.moe_num_active_primary_experts)()
        self.y = torch.empty(1, cfg.hidden_size)  # the experts' input: post-attention norm of h
        self._work = torch.empty(0)
        self._work_base = self._lib.st_attention_work_floats(self._ref, 0)  # + one score per head and key
        self._heads = cfg.num_attention_heads
        self._moe_work = torch.empty(self._lib.st_moe_dense_work_floats(
            cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.hidden_size, cfg.moe_num_active_primary_experts))
        self._moe_weights = (ctypes.c_float * cfg.moe_num_active_primary_experts)()
        self._gate_up_ptrs = (ctypes.c_void_p * cfg.moe_num_active_primary_experts)()
        self._down_ptrs = (ctypes.c_void_p * cfg.moe_num_active_primary_experts)()
        self._ffn = cfg.moe_ffn_hidden_size
        self._all_gate_up = self._all_down = None  # every expert's matrices, once bound
        self._bound: list = []

    def _runs(self, experts: list) -> bool:
        """Whether the native calls can run these experts: dense ReGLU experts of this layer's
        shape with fused (c backend, x4) matrices."""
        return all(isinstance(e, DenseReGLUExpert) and e.fused and e.ffn_features == self._ffn for e in experts)

    @property
    def has_experts(self) -> bool:
        """Whether `decode` can run (every expert bound)."""
        return self._all_gate_up is not None

    def bind_experts(self, experts: list) -> bool:
        """Keep pointers to all the layer's experts (resident for good, in expert order) for
        `decode`; False, and nothing bound, unless the native calls can run every one (`_runs`)."""
        if len(experts) != self._layer.n_experts or not self._runs(experts):
            return False
        self._all_gate_up = (ctypes.c_void_p * len(experts))(*(e.gate_up.blocks.data_ptr() for e in experts))
        self._all_down = (ctypes.c_void_p * len(experts))(*(e.down.blocks.data_ptr() for e in experts))
        self._bound = list(experts)  # the pointers above stay valid while these live
        return True

    def moe_batch(self, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token's experts (ids, weights [T, K]) of y [T, D], weighted and summed: [T, D], in
        one native call (`st_moe_batch`, moe.c; the same bits as `Block.moe` without a budget),
        every expert bound by `bind_experts`."""
        t, d = y.shape
        k = ids.shape[1]
        y = y.contiguous()
        ids32 = ids.to(torch.int32).contiguous()
        weights32 = weights.to(torch.float32).contiguous()
        work = scratch.moe_batch_work.get(self._lib.st_moe_batch_work_bytes(t, d, self._ffn, self._layer.n_experts, k))
        out = torch.zeros(t, d)
        self._lib.st_moe_batch(self._all_gate_up, self._all_down, self._layer.n_experts, k, d, self._ffn, t,
                               ids32.data_ptr(), weights32.data_ptr(), y.data_ptr(), out.data_ptr(), work.data_ptr())
        return out

    def unbind_experts(self) -> None:
        """Back to one call each for route, attention and experts (benchmarks/decode_profile.py --split)."""
        self._all_gate_up = self._all_down = None
        self._bound = []

    def decode(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, n_keys: int,
               rope: tuple[torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None) -> list[int]:
        """The whole layer for one token in one native call: `route`, `attend`, then `moe` over
        the chosen experts (bound by `bind_experts`); h [1, D] updated in place. Returns the
        chosen expert ids, best first."""
        cos, sin = self._attention_inputs(rope, n_keys)
        self._lib.st_layer_decode(self._ref, self._all_gate_up, self._all_down, self._ffn,
                                  None if bias is None else bias.data_ptr(), h.data_ptr(), self.y.data_ptr(),
                                  k_cache.data_ptr(), v_cache.data_ptr(), slot, n_keys, cos, sin,
                                  self._work.data_ptr(), self._moe_work.data_ptr(), self._ids, self._weights)
        return self._ids[:]

    def _attention_inputs(self, rope: tuple[torch.Tensor, torch.Tensor] | None, n_keys: int) -> tuple:
        """The RoPE tables' pointers (None, None without RoPE), with the work memory grown for
        `n_keys` keys (the attention's scores: one per head and key)."""
        if self._work.numel() < (need := self._work_base + self._heads * n_keys):
            self._work = torch.empty(max(need, 2 * self._work.numel()))
        return (None, None) if rope is None else (rope[0].data_ptr(), rope[1].data_ptr())

    def route(self, h: torch.Tensor, bias: torch.Tensor | None) -> tuple[list[int], list[float]]:
        """Top-k expert ids (best first) and their weights for the residual h [1, D]."""
        self._lib.st_route(self._ref, None if bias is None else bias.data_ptr(), h.data_ptr(),
                           self._ids, self._weights)
        return self._ids[:], self._weights[:]

    def attend(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, n_keys: int,
               rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """h [1, D] += attention (in place), the new key/value stored at `slot`, attending to
        `n_keys` cached keys; returns the post-attention norm of h (a reused buffer)."""
        cos, sin = self._attention_inputs(rope, n_keys)
        self._lib.st_attention_decode(self._ref, h.data_ptr(), self.y.data_ptr(), k_cache.data_ptr(),
                                      v_cache.data_ptr(), slot, n_keys, cos, sin, self._work.data_ptr())
        return self.y

    def moe(self, experts: list, weights: list[float], h: torch.Tensor) -> bool:
        """h [1, D] += sum_i weights[i] * experts[i](self.y), in list order and one native call
        (`st_moe_dense`: the same bits as one `accumulate` per expert); False, with nothing
        done, unless the native calls can run every expert (`_runs`; at most top-k of them)."""
        k = len(experts)
        if not 0 < k <= len(self._moe_weights) or not self._runs(experts):
            return False
        for i, (e, w) in enumerate(zip(experts, weights)):
            self._gate_up_ptrs[i], self._down_ptrs[i] = e.gate_up.blocks.data_ptr(), e.down.blocks.data_ptr()
            self._moe_weights[i] = w
        d = self._layer.d
        self._lib.st_moe_dense(self._gate_up_ptrs, self._down_ptrs, self._moe_weights, k, d, self._ffn, d,
                               self.y.data_ptr(), h.data_ptr(), self._moe_work.data_ptr())
        return True


def native_layer(cfg, w) -> NativeLayer | None:
    """The native step for a layer's weights `w` (`model.model.LayerWeights`), or None when its
    matrices are not Q4_0 on the `c` backend (the layer then decodes through torch)."""
    if not all(isinstance(m, Q4Matrix) and m.kernel == "c" for m in (w.qkv, w.o)):
        return None
    return NativeLayer(cfg, w.input_norm, w.post_norm, w.router, w.qkv, w.o)
