"""The bench's job done by Dask distributed, for a comparison measured in the same run.

C = A·B for n×n float64 matrices on a LocalCluster of `--workers` worker processes on this
machine: A cut into `--splits` row blocks and B into as many column blocks, scattered to the
workers, one task per tile of C (`--splits`² products), the tiles gathered and assembled into C
in the driver. Timed as gemmq's end to end is: from the first byte handed to the cluster to C
whole in the driver's memory. A and B are generated before the clock starts, as gemmq's producer
does; C is checked against A·(B·x) for a random x after the clock stops (gemmq checks too, inside
its time). The cluster is started, and the same matrices multiplied once untimed (in at most
4 × 4 tiles), before the timed runs: a warm cluster, as a long-lived deployment is (its first
job is ~1.5× slower, faulting in its workers' memory), so that the comparison does not flatter
gemmq.

Run by `gemmq-bench --dask PYTHON` (PYTHON: an interpreter with dask[distributed] and numpy); on
its own: `python dask_job.py --n 4096 --runs 3`. Prints one JSON object on its last line.
"""

import argparse
import json
import logging
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="side of A, B and C")
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    # The bench passes cores / workers: on 2 cores with 2 workers one each, which was faster than
    # two each (2.15 against 2.97 s at 4096: two BLAS threads each oversubscribe the cores).
    p.add_argument("--blas-threads", type=int, default=1, help="BLAS threads in each worker")
    p.add_argument("--splits", type=int, default=4, help="C is cut into splits × splits tiles")
    p.add_argument("--runs", type=int, default=3, help="timed runs on one cluster")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def main():
    args = parse_args()
    # The workers inherit this; it must be set before numpy loads OpenBLAS anywhere.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.blas_threads)
    import numpy as np
    from dask.distributed import Client, LocalCluster

    rng = np.random.default_rng(args.seed)
    a = rng.random((args.n, args.n))
    b = rng.random((args.n, args.n))
    x = rng.random(args.n)
    bx_expected = a @ (b @ x)

    cluster = LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    try:
        # The warm-up faults in the workers' memory; in 4 × 4 tiles at most, since the scheduler
        # needs no warming and 16,384 tiny tasks take Dask the best part of a minute.
        one_run(client, np, a, b, x, bx_expected, min(args.splits, 4))
        runs = []
        for _ in range(args.runs):
            runs.append(one_run(client, np, a, b, x, bx_expected, args.splits))
            print(f"dask_job.py: {runs[-1]['e2e_seconds']:.3f} s", file=sys.stderr)
    finally:
        client.close()
        cluster.close()
    print(
        json.dumps(
            {
                "n": args.n,
                "workers": args.workers,
                "blas_threads": args.blas_threads,
                "splits": args.splits,
                "runs": runs,
            }
        )
    )


def one_run(client, np, a, b, x, expected, splits):
    start = time.perf_counter()
    # Keys of their own (hash=False): content-hashed keys are the same from run to run, and the
    # previous run's release of them raced this run's use ("lost dependencies").
    rows = client.scatter(np.array_split(a, splits, axis=0), hash=False)
    cols = client.scatter(np.array_split(b, splits, axis=1), hash=False)
    tiles = [[client.submit(np.matmul, r, c) for c in cols] for r in rows]
    c = np.block(client.gather(tiles))
    e2e = time.perf_counter() - start
    del tiles, rows, cols
    error = float(np.max(np.abs(c @ x - expected)) / max(1.0, float(np.max(np.abs(expected)))))
    return {"e2e_seconds": e2e, "relative_error": error, "verified": error < 1e-9}


if __name__ == "__main__":
    main()
