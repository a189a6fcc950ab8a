"""ServerApp: FedAvg over one float32 vector of `num-params` parameters.

At the start (round 0) and after every round it appends
{"round": r, "t": <unix time>} to `stamp-file`, so the driver can compute
per-round wall time on the same clock it used to launch `flwr run`.
"""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    num_params = int(cfg["num-params"])
    min_nodes = int(cfg["min-nodes"])
    do_eval = bool(cfg["evaluate"])
    stamp_file = str(cfg["stamp-file"])

    def stamp(server_round: int, arrays: ArrayRecord):
        if stamp_file:
            with open(stamp_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"round": server_round, "t": time.time()}) + "\n")
        return None

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0 if do_eval else 0.0,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    initial = ArrayRecord([np.zeros(num_params, dtype=np.float32)])
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        timeout=600,
        evaluate_fn=stamp,
    )
    final = result.arrays.to_numpy_ndarrays()[0]
    # Each round adds 0.01 to every parameter, so the mean should be ~0.01 * R.
    print(f"final-mean={float(final.mean()):.4f} expected={0.01 * num_rounds:.4f}")
