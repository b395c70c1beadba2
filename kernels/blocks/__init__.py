"""Building blocks of the Triton GLA ops. Each module holds the @triton.jit kernels of one step and
their launchers; the ops (`kernels.triton_gla`, `kernels.triton_gla_refined`, `kernels.triton_regla`)
compose them.

    common        shared @triton.jit helpers (tile loads and stores, the safe-exp feature load, the
                  diagonal decay, the per-program head offsets), constants, launch options, host helpers
    gate          within-chunk cumulative log gates of a given log gate; the closed-form gate gradient
    refined_gate  the same cumulative gates from ReGLA's refining-gate logits; the logits' gradients
    chunk_state   the states between chunks: a forward pass and a reverse (gradient) pass
    output        within-chunk scores and the output
    norm_epilogue the output with the per-head RMSNorm and swish output gate applied before it is
                  stored, and its backward (the output recomputed)
    qkv_grad      gradients of q, k and v, and the local term of the gate gradient
    max_shift     the gradient through safe-exp's per-token max over features
"""
