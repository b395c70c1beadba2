"""Gated linear attention with a key-side and a value-side log gate as one fused recurrence in
Triton: `fused_recurrent_gla`, exact for any finite gate.

    S_t = diag(e^{gk_t}) S_{t-1} diag(e^{gv_t}) + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t

It is the value-gated op's fallback (`kernels.value_gate`) for gates that decay too fast for the
segmented rescaling onto the chunk kernels: the recurrence never divides by a decay, so nothing
grows, whatever the gates.

Layout: q, k, gk: [B, T, H, K]; v, gv, o: [B, T, H, V]; states [B, H, K, V]; every tensor
contiguous. One program per (block of BV value columns, batch·head) keeps its [BK, BV] slice of the
state in fp32 registers and walks the sequence one token at a time. K is not split (BK is K padded
to a power of two, K <= MAX_KEY_DIM), so each program's outputs o_t and gradients dv_t, dgv_t,
being sums over keys, are complete; what is a sum over value columns (dq, dk, dgk) is written as one
partial per value block and summed in torch.

Backward, one kernel per program:
  1. forward in time from the initial state: dq_t = scale · S_t do_t, and the state entering every
     CHECKPOINT-th step saved (fp32);
  2. backward in time, one checkpoint segment at a time, latest first: the segment's states are
     recomputed from its checkpoint into a per-program scratch buffer, then with dS the gradient of
     S_t (dS = dht after the last step; dS += scale · q_t do_tᵀ at each step)

         dk_t = dS v_t,   dv_t = dSᵀ k_t,
         P_t = diag(e^{gk_t}) S_{t-1} diag(e^{gv_t})        (the decayed previous state)
         dgk_t = rowsum(P_t ⊙ dS),   dgv_t = colsum(P_t ⊙ dS),
         dS ← diag(e^{gk_t}) dS diag(e^{gv_t})              (the gradient of S_{t-1})

     and the gradient of the initial state is the dS left after step 0.
The gate gradients use this direct form, each step's own decay against the gradient reaching it,
rather than the closed form Σ_{u>=t} (q_u ⊙ dq_u − k_u ⊙ dk_u) that the chunk kernels use: for a
closed gate (e^{gv} ≈ e^-8) the closed form is a difference of O(1) terms leaving an O(e^-8) result,
which loses ~3 digits in fp32; the direct form is a sum of products with no such cancellation.
Storing the states every CHECKPOINT steps, not every step, keeps the backward's memory at
T/CHECKPOINT states per (batch, head) plus one segment of scratch per program.

Numerics: inputs loaded in their dtype and upcast; the state, its gradient, every product and sum
in fp32; o, dq, dk, dv, dgk, dgv, dh0 returned in their inputs' dtypes, the final state in fp32.
No matrix products (tl.dot) are used, so bf16 inputs are exact under Triton's interpreter too.
Decays are applied as two factors, e^{gk} on rows then e^{gv} on columns (BK + BV exponentials a
step, not BK·BV); each factor is <= 1 for log gates <= 0, so neither can overflow.

Per-head scalar gates ([B, T, H, 1]) are broadcast to full width before the kernels (autograd sums
their gradients back). Packed sequences (`cu_seqlens`) are not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .blocks import common  # `common.empty`, looked up at call time: the tests swap in NaN-filled buffers
from .blocks.common import MAX_GRID_AXIS, cdiv, head_offset, next_power_of_2, on_device_of

Tensor = torch.Tensor

#: Largest key dim: the program holds all K rows of its state slice (and, in the backward, of its
#: gradient and of one recomputed state) in registers; 128 x 32 fp32 is 32 registers a thread per
#: tile over 4 warps.
MAX_KEY_DIM = 128
#: Largest value block. Smaller blocks mean more programs for the same work (B·H alone is often
#: below the GPU's SM count) but more partial sums of dq, dk and dgk (one [B, T, H, K] fp32 each
#: per value block); 32 gives 2 programs per head at V = 64.
VALUE_BLOCK = 32
#: Steps between the states the backward keeps: T/32 states per (batch, head) are stored, and a
#: segment of 32 recomputed states per program is scratch (sizes balanced for T in the thousands).
CHECKPOINT = 32
#: Untuned (no GPU measurements yet): a [128, 32] fp32 tile over 4 warps.
NUM_WARPS = 4


@triton.jit
def _load_step(ptr, n, mask):
    """One token's row (features 0..n masked by `mask`) in fp32; zeros where masked."""
    return tl.load(ptr + n, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def recurrent_forward_kernel(
    q,
    k,
    v,
    gk,
    gv,
    h0,
    o,
    ht,
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    KEY_GATE: tl.constexpr,
    VALUE_GATE: tl.constexpr,
    INITIAL: tl.constexpr,
    FINAL: tl.constexpr,
):
    """o (and the final state) for one value block of one (batch, head); see the module docstring."""
    iv, bh = tl.program_id(0), tl.program_id(1)
    keys = tl.arange(0, BK)
    cols = iv * BV + tl.arange(0, BV)
    key_in, col_in = keys < K, cols < V
    tile_in = key_in[:, None] & col_in[None, :]
    state_at = bh.to(tl.int64) * K * V + keys[:, None] * V + cols[None, :]  # [B, H, K, V] offsets
    # Per-token pointers of this head at t = 0, advanced by one row (H features apart) each step.
    pq = q + head_offset(bh, H, T, K) + keys
    pk = k + head_offset(bh, H, T, K) + keys
    pgk = gk + head_offset(bh, H, T, K) + keys
    pv = v + head_offset(bh, H, T, V) + cols
    pgv = gv + head_offset(bh, H, T, V) + cols
    po = o + head_offset(bh, H, T, V) + cols

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if INITIAL:
        state += tl.load(h0 + state_at, mask=tile_in, other=0.0).to(tl.float32)
    for t in range(0, T):
        row_k, row_v = t * H * K, t * H * V
        if KEY_GATE:
            state *= tl.exp(_load_step(pgk, row_k, key_in))[:, None]
        if VALUE_GATE:
            state *= tl.exp(_load_step(pgv, row_v, col_in))[None, :]
        state += _load_step(pk, row_k, key_in)[:, None] * _load_step(pv, row_v, col_in)[None, :]
        out = tl.sum(state * _load_step(pq, row_k, key_in)[:, None], axis=0) * scale
        tl.store(po + row_v, out.to(o.dtype.element_ty), mask=col_in)
    if FINAL:
        tl.store(ht + state_at, state, mask=tile_in)


@triton.jit
def recurrent_backward_kernel(
    q,
    k,
    v,
    gk,
    gv,
    h0,
    do,
    dht,
    checkpoints,
    scratch,
    dq,
    dk,
    dv,
    dgk,
    dgv,
    dh0,
    scale,
    T,
    H,
    K,
    V,
    NC,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    KEY_GATE: tl.constexpr,
    VALUE_GATE: tl.constexpr,
    INITIAL: tl.constexpr,
    FINAL_GRAD: tl.constexpr,
):
    """Every gradient for one value block of one (batch, head), in the two passes of the module
    docstring. dq, dk, dgk are this block's partials, [NV, B, T, H, K] fp32; dv, dgv, dh0 complete.
    """
    iv, bh = tl.program_id(0), tl.program_id(1)
    BH = tl.num_programs(1)
    keys = tl.arange(0, BK)
    cols = iv * BV + tl.arange(0, BV)
    key_in, col_in = keys < K, cols < V
    tile_in = key_in[:, None] & col_in[None, :]
    state_at = bh.to(tl.int64) * K * V + keys[:, None] * V + cols[None, :]
    pq = q + head_offset(bh, H, T, K) + keys
    pk = k + head_offset(bh, H, T, K) + keys
    pgk = gk + head_offset(bh, H, T, K) + keys
    pv = v + head_offset(bh, H, T, V) + cols
    pgv = gv + head_offset(bh, H, T, V) + cols
    pdo = do + head_offset(bh, H, T, V) + cols
    pdv = dv + head_offset(bh, H, T, V) + cols
    pdgv = dgv + head_offset(bh, H, T, V) + cols
    # This block's slice of the key-width partials [NV, B, T, H, K]: B·H·T·K elements each.
    partial = iv.to(tl.int64) * BH * T * K + head_offset(bh, H, T, K) + keys
    pdq, pdk, pdgk = dq + partial, dk + partial, dgk + partial
    # Padded [BK, BV] tiles (zero outside K and V, as the state is), so no masks on these buffers.
    tile = keys[:, None] * BV + tl.arange(0, BV)[None, :]
    program = iv.to(tl.int64) * BH + bh
    checkpoint_base = checkpoints + program * NC * BK * BV
    scratch_base = scratch + program * C * BK * BV

    # Pass 1, forward in time: checkpoints and dq_t = scale · S_t do_t.
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if INITIAL:
        state += tl.load(h0 + state_at, mask=tile_in, other=0.0).to(tl.float32)
    for c in range(0, NC):
        tl.store(checkpoint_base + c * BK * BV + tile, state)
        end = c * C + C
        if end > T:
            end = T
        for t in range(c * C, end):
            row_k, row_v = t * H * K, t * H * V
            if KEY_GATE:
                state *= tl.exp(_load_step(pgk, row_k, key_in))[:, None]
            if VALUE_GATE:
                state *= tl.exp(_load_step(pgv, row_v, col_in))[None, :]
            state += _load_step(pk, row_k, key_in)[:, None] * _load_step(pv, row_v, col_in)[None, :]
            dq_t = tl.sum(state * _load_step(pdo, row_v, col_in)[None, :], axis=1) * scale
            tl.store(pdq + row_k, dq_t, mask=key_in)

    # The checkpoints were stored by other threads of this program than may load them in pass 2.
    tl.debug_barrier()

    # Pass 2, backward in time, one segment at a time, latest first.
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if FINAL_GRAD:
        dstate += tl.load(dht + state_at, mask=tile_in, other=0.0).to(tl.float32)
    for c_rev in range(0, NC):
        c = NC - 1 - c_rev
        end = c * C + C
        if end > T:
            end = T
        # The state entering each step of the segment, from its checkpoint, into scratch row t − c·C.
        state = tl.load(checkpoint_base + c * BK * BV + tile)
        for t in range(c * C, end):
            row_k, row_v = t * H * K, t * H * V
            tl.store(scratch_base + (t - c * C) * BK * BV + tile, state)
            if KEY_GATE:
                state *= tl.exp(_load_step(pgk, row_k, key_in))[:, None]
            if VALUE_GATE:
                state *= tl.exp(_load_step(pgv, row_v, col_in))[None, :]
            state += _load_step(pk, row_k, key_in)[:, None] * _load_step(pv, row_v, col_in)[None, :]
        # The scratch rows were stored by other threads of this program than may load them below.
        tl.debug_barrier()
        for j in range(c * C, end):
            t = end - 1 + c * C - j  # end − 1 down to c·C
            row_k, row_v = t * H * K, t * H * V
            q_t = _load_step(pq, row_k, key_in)
            dstate += (scale * q_t)[:, None] * _load_step(pdo, row_v, col_in)[None, :]  # now all of dL/dS_t
            tl.store(pdk + row_k, tl.sum(dstate * _load_step(pv, row_v, col_in)[None, :], axis=1), mask=key_in)
            tl.store(pdv + row_v, tl.sum(dstate * _load_step(pk, row_k, key_in)[:, None], axis=0), mask=col_in)
            if KEY_GATE or VALUE_GATE:
                decay_k = tl.full([BK], 1.0, tl.float32)
                decay_v = tl.full([BV], 1.0, tl.float32)
                if KEY_GATE:
                    decay_k = tl.exp(_load_step(pgk, row_k, key_in))
                if VALUE_GATE:
                    decay_v = tl.exp(_load_step(pgv, row_v, col_in))
                # P_t ⊙ dS: the decayed previous state against the gradient reaching it, a product
                # of factors that do not cancel (the direct form of the module docstring).
                previous = tl.load(scratch_base + (t - c * C) * BK * BV + tile)
                touched = previous * decay_k[:, None] * decay_v[None, :] * dstate
                if KEY_GATE:
                    tl.store(pdgk + row_k, tl.sum(touched, axis=1), mask=key_in)
                if VALUE_GATE:
                    tl.store(pdgv + row_v, tl.sum(touched, axis=0), mask=col_in)
                dstate = dstate * decay_k[:, None] * decay_v[None, :]
        # The next segment overwrites the scratch rows just read, possibly by other threads.
        tl.debug_barrier()
    if INITIAL:
        tl.store(dh0 + state_at, dstate, mask=tile_in)


def _blocks(K: int, V: int) -> tuple[int, int, int]:
    """BK (K padded to a power of two), BV and the number of value blocks NV."""
    BV = min(VALUE_BLOCK, next_power_of_2(V))
    return next_power_of_2(K), BV, cdiv(V, BV)


class FusedRecurrentGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gk, gv, scale, initial_state, output_final_state):
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV, NV = _blocks(K, V)
        o = common.empty((B, T, H, V), q.dtype, q.device)
        final = common.empty((B, H, K, V), torch.float32, q.device) if output_final_state else None
        recurrent_forward_kernel[(NV, B * H)](
            q,
            k,
            v,
            gk if gk is not None else q,  # placeholders, never read without the gate
            gv if gv is not None else v,
            initial_state if initial_state is not None else q,
            o,
            final if final is not None else o,
            scale,
            T,
            H,
            K,
            V,
            BK=BK,
            BV=BV,
            KEY_GATE=gk is not None,
            VALUE_GATE=gv is not None,
            INITIAL=initial_state is not None,
            FINAL=final is not None,
            num_warps=NUM_WARPS,
        )
        # Nothing from the forward is kept but the inputs: the backward recomputes the states.
        ctx.save_for_backward(q, k, v, gk, gv, initial_state)
        ctx.scale = scale
        return o, final

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, do, dht):
        q, k, v, gk, gv, initial_state = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV, NV = _blocks(K, V)
        NC = cdiv(T, CHECKPOINT)
        device = q.device
        f32 = torch.float32
        do = do.contiguous()
        dht = dht.contiguous() if dht is not None else None
        checkpoints = common.empty((NV, B * H, NC, BK, BV), f32, device)
        scratch = common.empty((NV, B * H, CHECKPOINT, BK, BV), f32, device)
        dq = common.empty((NV, B, T, H, K), f32, device)
        dk = common.empty((NV, B, T, H, K), f32, device)
        dv = common.empty((B, T, H, V), f32, device)
        dgk = common.empty((NV, B, T, H, K), f32, device) if gk is not None else None
        dgv = common.empty((B, T, H, V), f32, device) if gv is not None else None
        dh0 = common.empty((B, H, K, V), f32, device) if initial_state is not None else None
        with on_device_of(q):
            recurrent_backward_kernel[(NV, B * H)](
                q,
                k,
                v,
                gk if gk is not None else q,
                gv if gv is not None else v,
                initial_state if initial_state is not None else q,
                do,
                dht if dht is not None else do,
                checkpoints,
                scratch,
                dq,
                dk,
                dv,
                dgk if dgk is not None else dq,
                dgv if dgv is not None else dv,
                dh0 if dh0 is not None else dv,
                ctx.scale,
                T,
                H,
                K,
                V,
                NC,
                BK=BK,
                BV=BV,
                C=CHECKPOINT,
                KEY_GATE=gk is not None,
                VALUE_GATE=gv is not None,
                INITIAL=initial_state is not None,
                FINAL_GRAD=dht is not None,
                num_warps=NUM_WARPS,
            )
        # Partials over value blocks summed in fp32, then cast to the inputs' dtypes.
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
        dgk = dgk.sum(0).to(gk.dtype) if dgk is not None else None
        dgv = dgv.to(gv.dtype) if dgv is not None else None
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv.to(v.dtype), dgk, dgv, None, dh0, None


def check_recurrent_supported(q: Tensor, v: Tensor) -> None:
    """Key dims up to MAX_KEY_DIM; B·H programs fit the launch grid's second axis; offsets inside
    one batch element must fit in 32 bits.

    Raises:
        ValueError: when the kernels cannot take these shapes.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_KEY_DIM:
        raise ValueError(
            f"the fused recurrent GLA kernels hold all K rows of the state in registers and support "
            f"K up to {MAX_KEY_DIM}; got K={K}"
        )
    if B * H > MAX_GRID_AXIS:
        raise ValueError(
            f"the fused recurrent GLA kernels launch one program per batch row and head on a grid axis "
            f"of at most {MAX_GRID_AXIS}; got B * H = {B * H} (B={B}, H={H}): split the batch"
        )
    if max(T, 1) * H * max(K, V) >= 2**31:
        raise ValueError(
            f"T * H * max(K, V) must stay below 2^31 per batch element for the fused recurrent GLA "
            f"kernels; got T={T}, H={H}, K={K}, V={V}: split the sequence or the heads"
        )


def fused_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention as a fused recurrence (same contract as the references, without packed
    sequences); exact for any finite gate, at one token per step.

    Args:
        q, k: [B, T, H, K], K <= MAX_KEY_DIM.
        v: [B, T, H, V]; q, k, v of one float dtype.
        gk: key-side log gate [B, T, H, K] or [B, T, H, 1] (one per head), or None for no decay.
        gv: value-side log gate [B, T, H, V] or [B, T, H, 1], or None.
        scale: the output's scale.
        initial_state: [B, H, K, V], or None for zeros.
        output_final_state: whether to return the final state.
        cu_seqlens: must be None (packed sequences are not supported).

    Returns:
        o: [B, T, H, V] in q's dtype.
        final_state: [B, H, K, V] fp32, or None unless `output_final_state`.

    Raises:
        ValueError: with `cu_seqlens`, or for shapes the kernels cannot take (`check_recurrent_supported`).
    """
    if cu_seqlens is not None:
        raise ValueError("fused_recurrent_gla does not take packed sequences (cu_seqlens); use triton_gla")
    check_recurrent_supported(q, v)
    # Scalar gates broadcast to full width: autograd sums their gradients back over the features.
    if gk is not None and gk.shape[-1] == 1:
        gk = gk.expand(*k.shape)
    if gv is not None and gv.shape[-1] == 1:
        gv = gv.expand(*v.shape)
    q, k, v = (t.contiguous() for t in (q, k, v))
    gk, gv, initial_state = (t.contiguous() if t is not None else None for t in (gk, gv, initial_state))
    with on_device_of(q):
        return FusedRecurrentGLAFunction.apply(q, k, v, gk, gv, float(scale), initial_state, output_final_state)
