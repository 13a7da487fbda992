"""The three Triton kernels every LoRA pass is built from, and the @triton.jit helpers they share.

``lora_matmul_kernel``: ``out[M, N] = a[M, K] @ w[N, K]^T + lora(h[M, R] @ b[N, R]^T) + bias``
    the base GEMM with the rank-R product appended to its K-loop (K-concatenation): R extra
    K-steps, ``2*M*N*R`` FLOPs (0.4% of the base at K=4096, r=16), no second [M, N] tensor.
    Forward:  a=x,  w=W,   h=dropout(x)A^T, b=B,   lora = s * h B^T (s folded into h's tile).
    Backward: a=dY, w=W^T, h=dh,            b=A^T, lora = dropout(dh A), masked before the
    base K-loop starts.

``skinny_kernel``: ``out[M, R] = scale * dropout(a[M, K]) @ w[R, K]^T`` (+ row sums of a)
    a matmul whose output has only R <= 256 columns, so one program holds a whole [BLOCK_M, R]
    row panel and reads ``a`` once. It computes h (forward) and dA^T = dropout(x)^T dh, each by
    passing strides (and, where results must be bitwise reproducible, dh and dB = s dY^T h with
    dbias as the row sums of dY^T, each its own read of dY).

``dy_kernel``: ``dh = s dY B`` [M, R], ``dB += s dY^T h`` [N, R], ``dbias += colsum(dY)`` [N] from one
    read of dY: a program owns a row panel of dY (and of dh) and walks a run of its column tiles;
    dB and dbias sum over row panels with fp32 atomic adds (their order, so the last bits, vary).

Every operand is addressed by explicit strides, so transposed views and non-contiguous inputs
cost no copy. The dropout mask of element (i, j) of ``a`` (or of ``out`` in the matmul kernel) is
regenerated from ``seed`` and the index ``i*IDX_S0 + j*IDX_S1`` of that element in x [M, K].
"""

import triton
import triton.language as tl


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finalizer on uint32 (same constants as lorakern.dropout)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def dropout_keep(seed, idx, threshold):
    """Keep mask for int64 element indices ``idx``: the twin of :func:`lorakern.dropout.random_bits`
    (see lorakern/dropout.py for the definition; the tests hold the two bit-identical)."""
    idx = idx.to(tl.int64)
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    key = fmix32(seed ^ (hi * 0x9E3779B9))
    bits = fmix32(fmix32(lo ^ key) + key) >> 8
    return bits.to(tl.int32) >= threshold


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_F32:  # interpreter only: it multiplies bf16 bit patterns, so compute in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _row_rank_offsets(pid_m, pid_r, M, R, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, USE_INT64: tl.constexpr):
    """Row and rank offsets of a [BLOCK_M, BLOCK_R] output tile, and their in-bounds masks."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    return offs_m, offs_r, offs_m < M, offs_r < R


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row panel, column panel) in grouped launch order: GROUP_M row panels share
    each column panel of w while it is in L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % group) % rows_in_group, (pid % group) // rows_in_group


@triton.jit
def lora_matmul_kernel(
    a_ptr, w_ptr, h_ptr, b_ptr, bias_ptr, out_ptr, seed_ptr, ascale_ptr, colscale_ptr, z_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wn, stride_wk, stride_hm, stride_hr,
    stride_bn, stride_br, stride_om, stride_on, stride_bias, stride_zm, stride_zn,
    scaling, threshold, inv_keep,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr,
    A_DROPOUT: tl.constexpr, OUT_DROPOUT: tl.constexpr, A_SCALE: tl.constexpr, COL_SCALE: tl.constexpr,
    STORE_Z: tl.constexpr, ADD_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """DoRA's variants (see lorakern/ops/dora.py), each a constexpr that is off for plain LoRA:
    A_DROPOUT 1: ``a`` is dropout(x) in the K-loop, 2: ``x - dropout(x)`` (the forward with dropout);
    A_SCALE: ``a``'s column k scaled by ``ascale[k]`` (dx: ``(g * dY) W``); OUT_DROPOUT: everything
    computed is masked by dropout after the K-loop (dx with dropout: ``D((g - 1) dY W + dh A)``);
    STORE_Z: the accumulator (``z``) stored before COL_SCALE scales column n by ``colscale[n]``;
    ADD_OUT: ``out`` is added to, not overwritten."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = out_ptr.dtype.element_ty
    if HAS_DROPOUT or A_DROPOUT != 0 or OUT_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)

    # The rank-R part first, as the accumulator's initial value: cdiv(R, BLOCK_R) K-steps over
    # [h | b], masked beyond R (BLOCK_R >= 16, the MMA minimum: r=1..16 is one padded step).
    # With dropout (backward dx) the mask of x[m, k] applies to (dh A)[m, k] after the product,
    # so it is masked here, before the base K-loop starts: only one [BLOCK_M, BLOCK_N]
    # accumulator is ever live (two spilled at 128x128 with 8 warps).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if not HAS_DROPOUT:  # forward: s * h, rounded once to the input dtype as PEFT's h would be
            h = (h.to(tl.float32) * scaling).to(dtype)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(h.to(dtype), b.to(dtype), acc, DOT_F32, PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, offs_m[:, None].to(tl.int64) * N + offs_n[None, :], threshold)
        acc = tl.where(keep, acc * inv_keep, 0.0)

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if A_DROPOUT != 0:  # a = x [M, K]: element (m, k) has dropout index m * K + k
            keep_a = dropout_keep(seed, offs_m[:, None].to(tl.int64) * K + (k0 + offs_k[None, :]), threshold)
            kept = tl.where(keep_a, a.to(tl.float32) * inv_keep, 0.0)
            a = (kept if A_DROPOUT == 1 else a.to(tl.float32) - kept).to(dtype)
        if A_SCALE:
            v = tl.load(ascale_ptr + k0 + offs_k, mask=mask_k, other=0.0)
            a = (a.to(tl.float32) * v[None, :]).to(dtype)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, w, acc, DOT_F32, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask_out = mask_m[:, None] & mask_n[None, :]
    if OUT_DROPOUT:
        keep = dropout_keep(seed, offs_m[:, None].to(tl.int64) * N + offs_n[None, :], threshold)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    if STORE_Z:
        tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, acc.to(dtype), mask=mask_out)
    if COL_SCALE:
        acc = acc * tl.load(colscale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if ADD_OUT:
        acc += tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(dtype), mask=mask_out)


@triton.jit
def skinny_kernel(
    a_ptr, w_ptr, out_ptr, rowsum_ptr, seed_ptr,
    M, K, R,
    stride_am, stride_ak, stride_wr, stride_wk, stride_om, stride_or,
    IDX_S0, IDX_S1,
    scale, threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, HAS_ROWSUM: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(1)
    offs_m, offs_r, mask_m, mask_r = _row_rank_offsets(tl.program_id(0), pid_r, M, R, BLOCK_M, BLOCK_R, USE_INT64)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = a_ptr.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_r[None, :] * stride_wr + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        if HAS_DROPOUT:
            idx = offs_m[:, None].to(tl.int64) * IDX_S0 + (k0 + offs_k[None, :]).to(tl.int64) * IDX_S1
            keep = dropout_keep(seed, idx, threshold)
            a = tl.where(keep, a.to(tl.float32) * inv_keep, 0.0).to(dtype)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _dot(a, w.to(dtype), acc, DOT_F32, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
    if HAS_ROWSUM:
        if pid_r == 0:
            tl.store(rowsum_ptr + offs_m, rowsum.to(rowsum_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def dy_kernel(
    a_ptr, b_ptr, h_ptr, dh_ptr, db_ptr, dbias_ptr, z_ptr, dm_ptr,
    M, N, R, TILES_PER_SPLIT,
    stride_am, stride_an, stride_bn, stride_br, stride_hm, stride_hr,
    stride_dhm, stride_dhr, stride_dbn, stride_dbr, stride_zm, stride_zn,
    scale,
    HAS_DH: tl.constexpr, DH_ATOMIC: tl.constexpr, HAS_DB: tl.constexpr, HAS_DBIAS: tl.constexpr,
    HAS_DM: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """a = dY [M, N], b = B [N, R], h [M, R]; dh [M, R] fp32 (added to when DH_ATOMIC: the column
    tiles are split over programs), db [N, R] and dbias [N] fp32, zeroed by the caller. HAS_DM
    (DoRA): dm [N] fp32 += column sums of dY * z, z [M, N] read beside each dY tile."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_m, offs_r, mask_m, mask_r = _row_rank_offsets(pid_m, pid_r, M, R, BLOCK_M, BLOCK_R, USE_INT64)
    dtype = a_ptr.dtype.element_ty
    if HAS_DB:
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(dtype)
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    # This program's run of column tiles, entered at a tile that depends on the row panel: all row
    # panels start together, and in step they would add into the same dB rows at the same time.
    num_tiles = tl.cdiv(N, BLOCK_N)
    first = pid_s * TILES_PER_SPLIT
    count = tl.minimum(num_tiles - first, TILES_PER_SPLIT)
    for i in range(0, count):
        tile = first + (i + pid_m) % count
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_INT64:
            offs_n = offs_n.to(tl.int64)
        mask_n = offs_n < N
        dy = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if HAS_DH:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            dh = _dot(dy, b.to(dtype), dh, DOT_F32, PRECISION)
        if HAS_DB:
            part = _dot(tl.trans(dy), h, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), DOT_F32, PRECISION)
            tl.atomic_add(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, part * scale,
                          mask=mask_n[:, None] & mask_r[None, :], sem="relaxed")
        if HAS_DBIAS:
            if pid_r == 0:
                tl.atomic_add(dbias_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n, sem="relaxed")
        if HAS_DM:
            if pid_r == 0:
                z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn,
                            mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                tl.atomic_add(dm_ptr + offs_n, tl.sum(dy.to(tl.float32) * z.to(tl.float32), axis=0), mask=mask_n,
                              sem="relaxed")

    if HAS_DH:
        dh_ptrs = dh_ptr + offs_m[:, None] * stride_dhm + offs_r[None, :] * stride_dhr
        mask = mask_m[:, None] & mask_r[None, :]
        if DH_ATOMIC:
            tl.atomic_add(dh_ptrs, dh * scale, mask=mask, sem="relaxed")
        else:
            tl.store(dh_ptrs, dh * scale, mask=mask)


# -- several adapters in one batch (lorakern/triton/multi.py) ----------------------------------
#
# Each row m of the batch names an adapter ``index[m]`` (-1: none); the rows a program takes are
# a tile of ``order`` (sorted by adapter, or as they come for decode). A tile holds runs of rows
# with one adapter: each run costs one rank-part dot with that adapter's weights, so a sorted tile
# of 128 rows that holds 2 adapters does 2 small dots beside the unchanged base GEMM, and a decode
# tile of 8 rows naming 8 adapters reads 8 adapters' weights (BGMV's cost), with no sort.
# Per-adapter scalars (rank, scaling, dropout threshold and 1/keep) are [n] tensors.


@triton.jit
def _tile_rows(order_ptr, index_ptr, pid_m, M, BLOCK_M: tl.constexpr, HAS_ORDER: tl.constexpr,
               USE_INT64: tl.constexpr):
    """The rows of tile ``pid_m`` (from ``order`` or in place), their adapters (-1 beyond M) and
    the number of valid rows."""
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs < M
    if HAS_ORDER:
        rows = tl.load(order_ptr + offs, mask=valid, other=0)
    else:
        rows = offs
    rows = rows.to(tl.int64) if USE_INT64 else rows.to(tl.int32)
    adapters = tl.load(index_ptr + rows, mask=valid, other=-1).to(tl.int32)
    return rows, adapters, valid, tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)


@triton.jit
def _next_run(adapters, i, count, BLOCK_M: tl.constexpr):
    """The adapter of row i of a tile and where its run of equal adapters ends."""
    pos = tl.arange(0, BLOCK_M)
    adapter = tl.sum(tl.where(pos == i, adapters, 0), axis=0)
    end = tl.min(tl.where((pos > i) & (pos < count) & (adapters != adapter), pos, count), axis=0)
    return adapter, end, (pos >= i) & (pos < end)


@triton.jit
def multi_skinny_kernel(
    a_ptr, w_ptr, out_ptr, order_ptr, index_ptr, seed_ptr, rank_ptr, scale_ptr, thresh_ptr, invkeep_ptr,
    M, K, R,
    stride_am, stride_ak, stride_wa, stride_wr, stride_wk, stride_om, stride_or,
    HAS_ORDER: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """``out[m, :] = s_a dropout_a(a[m, :]) w_a^T`` [M, R] for each row m of adapter a, w_a [r_a, K]
    (columns r_a..R of out are 0; rows of no adapter are left alone). h (a = x) and dh (a = dY,
    w_a = B_a^T). The dropout index of a[m, k] is m * K + k, as in the one-adapter kernels."""
    pid_r = tl.program_id(1)
    rows, adapters, valid, count = _tile_rows(order_ptr, index_ptr, tl.program_id(0), M, BLOCK_M, HAS_ORDER,
                                              USE_INT64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = a_ptr.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
    i = 0
    while i < count:
        adapter, end, run = _next_run(adapters, i, count, BLOCK_M)
        if adapter >= 0:
            mask_r = offs_r < tl.load(rank_ptr + adapter)
            w_base = w_ptr + adapter.to(tl.int64) * stride_wa
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask_k = offs_k < K - k0
                a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + offs_k[None, :]) * stride_ak,
                            mask=run[:, None] & mask_k[None, :], other=0.0)
                if HAS_DROPOUT:
                    keep = dropout_keep(seed, rows[:, None].to(tl.int64) * K + (k0 + offs_k[None, :]),
                                        tl.load(thresh_ptr + adapter))
                    a = tl.where(keep, a.to(tl.float32) * tl.load(invkeep_ptr + adapter), 0.0).to(dtype)
                w = tl.load(w_base + offs_r[None, :] * stride_wr + (k0 + offs_k[:, None]) * stride_wk,
                            mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                acc = _dot(a, w.to(dtype), acc, DOT_F32, PRECISION)
            acc = acc * tl.load(scale_ptr + adapter)
            tl.store(out_ptr + rows[:, None] * stride_om + offs_r[None, :] * stride_or,
                     acc.to(out_ptr.dtype.element_ty), mask=run[:, None] & (offs_r < R)[None, :])
        i = end


@triton.jit
def _per_row_rank_part(acc, h_ptr, b_ptr, rank_ptr, scale_ptr, rows, adapters, offs_n, mask_n,
                       stride_hm, stride_hr, stride_ba, stride_bn, stride_br, dtype, STEP_R: tl.constexpr):
    """``acc[m] += (scale_a h[m]) b_a^T`` with a = adapters[m], each row gathering its own
    adapter's [BLOCK_N, BLOCK_R] panel of b: a [BLOCK_M, BLOCK_N, BLOCK_R] product summed over the
    rank (16 x 32 x 16 on 256 threads: 32 values each). No loop over runs of adapters, whose
    tile-wide reductions and loop-carried row vectors spilled 8-24 B at 48-64 registers on sm_80
    with Triton 3.8. h s is rounded to the dtype as in the dot path; the products of two 16-bit
    values are exact in fp32, so only the order of the fp32 sum differs."""
    has = adapters >= 0
    lookup = tl.maximum(adapters, 0)
    rank = tl.load(rank_ptr + lookup, mask=has, other=0)
    scale = tl.load(scale_ptr + lookup, mask=has, other=0.0)
    b_rows = b_ptr + lookup.to(tl.int64) * stride_ba
    for r0 in range(0, tl.max(rank, axis=0), STEP_R):
        offs_r = r0 + tl.arange(0, STEP_R)
        mask_r = offs_r[None, :] < rank[:, None]
        h = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr, mask=mask_r, other=0.0)
        h = (h.to(tl.float32) * scale[:, None]).to(dtype)
        b = tl.load(b_rows[:, None, None] + offs_n[None, :, None] * stride_bn + offs_r[None, None, :] * stride_br,
                    mask=mask_r[:, None, :] & mask_n[None, :, None], other=0.0)
        acc += tl.sum(h.to(tl.float32)[:, None, :] * b.to(dtype).to(tl.float32), axis=2)
    return acc


@triton.jit
def multi_matmul_kernel(
    a_ptr, w_ptr, h_ptr, b_ptr, bias_ptr, out_ptr, order_ptr, index_ptr, seed_ptr, rank_ptr, scale_ptr,
    thresh_ptr, invkeep_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_hm, stride_hr,
    stride_ba, stride_bn, stride_br, stride_om, stride_on, stride_bias,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ORDER: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, PER_ROW: tl.constexpr,
):
    """``out[m] = a[m] w^T + lora_a(m) + bias``, ``lora = (scale_a h[m]) b_a^T`` with b_a [N, r_a]:
    the forward (h unscaled, scale = s) and dx (h = dh, scale = 1, b_a = A_a^T; with HAS_DROPOUT the
    rank part masked per row by its adapter's dropout, index m * N + n, before the base K-loop as
    in lora_matmul_kernel). PER_ROW (16-row tiles): each row gathers its own adapter's B panel and
    the rank part is a broadcast multiply-add, as Punica's BGMV; else one rank dot per run of rows
    of one adapter."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, adapters, valid, count = _tile_rows(order_ptr, index_ptr, pid_m, M, BLOCK_M, HAS_ORDER, USE_INT64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    dtype = out_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PER_ROW:
        acc = _per_row_rank_part(acc, h_ptr, b_ptr, rank_ptr, scale_ptr, rows, adapters, offs_n, mask_n,
                                 stride_hm, stride_hr, stride_ba, stride_bn, stride_br, dtype, 8)
    i = count if PER_ROW else 0
    while i < count:
        adapter, end, run = _next_run(adapters, i, count, BLOCK_M)
        if adapter >= 0:
            rank = tl.load(rank_ptr + adapter)
            b_base = b_ptr + adapter.to(tl.int64) * stride_ba
            for r0 in range(0, rank, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < rank
                h = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                            mask=run[:, None] & mask_r[None, :], other=0.0)
                h = (h.to(tl.float32) * tl.load(scale_ptr + adapter)).to(dtype)  # rounded once, as PEFT's s h
                b = tl.load(b_base + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                            mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                acc = _dot(h.to(dtype), b.to(dtype), acc, DOT_F32, PRECISION)
        i = end
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
        lookup = tl.maximum(adapters, 0)  # rows of no adapter have no rank part: any threshold will do
        keep = dropout_keep(seed, rows[:, None].to(tl.int64) * N + offs_n[None, :],
                            tl.load(thresh_ptr + lookup)[:, None])
        acc = tl.where(keep, acc * tl.load(invkeep_ptr + lookup)[:, None], 0.0)

    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, w, acc, DOT_F32, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(dtype),
             mask=valid[:, None] & mask_n[None, :])


@triton.jit
def segment_skinny_kernel(
    a_ptr, w_ptr, out_ptr, order_ptr, segment_ptr, seed_ptr, rank_ptr, scale_ptr, thresh_ptr, invkeep_ptr,
    K, R,
    stride_am, stride_ak, stride_wm, stride_wr, stride_oa, stride_ok, stride_or,
    HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per adapter a (program axis 0): ``out_a[k, r] = s_a sum_m dropout_a(a[m, k]) w[m, r]`` over
    a's rows only, ``order[segment[a]:segment[a + 1]]`` (rows sorted by adapter); [K, R], columns
    r_a..R and adapters without rows 0. dA^T (a = x, w = dh, s = 1) and dB (a = dY, w = h). Here
    BLOCK_M tiles K (the output's rows) and BLOCK_K the rows summed over, as skinny_kernel's dA."""
    adapter = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    if USE_INT64:
        offs_k = offs_k.to(tl.int64)
    mask_k = offs_k < K
    mask_r = offs_r < tl.load(rank_ptr + adapter)
    first = tl.load(segment_ptr + adapter)
    last = tl.load(segment_ptr + adapter + 1)
    dtype = a_ptr.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
        threshold = tl.load(thresh_ptr + adapter)
        inv_keep = tl.load(invkeep_ptr + adapter)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for m0 in range(first, last, BLOCK_K):
        pos = m0 + tl.arange(0, BLOCK_K)
        in_seg = pos < last
        rows = tl.load(order_ptr + pos, mask=in_seg, other=0)
        rows = rows.to(tl.int64) if USE_INT64 else rows.to(tl.int32)
        a = tl.load(a_ptr + rows[None, :] * stride_am + offs_k[:, None] * stride_ak,
                    mask=mask_k[:, None] & in_seg[None, :], other=0.0)  # [BLOCK_M (k), BLOCK_K (rows)]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rows[None, :].to(tl.int64) * K + offs_k[:, None], threshold)
            a = tl.where(keep, a.to(tl.float32) * inv_keep, 0.0).to(dtype)
        w = tl.load(w_ptr + rows[:, None] * stride_wm + offs_r[None, :] * stride_wr,
                    mask=in_seg[:, None] & mask_r[None, :], other=0.0)
        acc = _dot(a, w.to(dtype), acc, DOT_F32, PRECISION)
    acc = acc * tl.load(scale_ptr + adapter)
    tl.store(out_ptr + adapter.to(tl.int64) * stride_oa + offs_k[:, None] * stride_ok + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & (offs_r < R)[None, :])
