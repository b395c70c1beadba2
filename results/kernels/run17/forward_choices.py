"""Forward of our plain GLA op under the forward's three new choices, each against its old value."""
import itertools, sys, json
import torch
from triton.testing import do_bench
sys.path.insert(0, ".")
import importlib
tg = importlib.import_module("kernels.triton_gla")
from kernels.blocks import output
from kernels.triton_gla import triton_gla

SHAPES = [(1, 8192, 96, 128), (4, 4096, 64, 128), (16, 4096, 12, 64), (8, 1024, 8, 64)]
operand = tg.operand_dtype
rows = []
for B, T, H, D in SHAPES:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda")).clamp_min(-5).bfloat16()
    ref = None
    for diag, ocols, bf16_states in itertools.product((128,), (64, 128), (False, True)):
        output.MAX_DIAG_FEATURES, output.MAX_OUTPUT_COLUMNS = diag, ocols
        tg.operand_dtype = operand if bf16_states else (lambda dims: torch.float32)
        with torch.no_grad():
            o = triton_gla(q, k, v, g, scale=D**-0.5)[0]
            if ref is None:
                ref = o.float()
            err = ((o.float() - ref).norm() / ref.norm()).item()
            ms = do_bench(lambda: triton_gla(q, k, v, g, scale=D**-0.5), warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
        row = dict(B=B, T=T, H=H, D=D, diag_features=diag, output_columns=ocols, bf16_states=bf16_states, fwd_ms=ms[0], p20=ms[1], p80=ms[2], rel_diff_vs_first=err)
        print(row, flush=True)
        rows.append(row)
import pandas as pd
pd.DataFrame(rows).to_parquet(sys.argv[1], index=False)
