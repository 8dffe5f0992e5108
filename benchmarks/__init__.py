"""The side-by-side benchmark of cce_inductor against the logits GEMM, torch and its peers.

    python -m benchmarks.lce_bench --out bench.json        # GPU: the full run, JSON + printed table
    python -m benchmarks.plot bench.json --out bench.png   # time and memory against N
    python -m benchmarks.lce_bench --smoke --out smoke.json  # CPU: tiny shapes, the same code paths
"""
