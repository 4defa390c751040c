"""Flower baseline for dpfl-bench: Flower's simulation (Ray backend) on the same partitions,
model and hyper-parameters as the `dpfl-sim` benchmark rows (bench/sim/main-shape.toml):
Fashion-MNIST split over the clients of `--parts` (JSON list of index lists written by
dpfl-bench from dpfl's own partitioner), the 784-200-200-10 MLP, E = 1, B = 32, SGD 0.05,
FedAvg with every client every round, no DP, central evaluation after the last round only.

Each client trains on 1 CPU with 1 torch thread and Ray runs `--cpus` of them at a time
(dpfl-sim: `threads` training threads, libtorch on 1 thread each). Round time is the time
between consecutive `aggregate_fit` calls (round 1 is measured from the start of round 1's
`configure_fit`). Prints one JSON line. Needs flwr[simulation] 1.42 (scripts/bench.sh
--with-flower installs it into .venv-flower) and torch (the project's, via a .pth file)."""
import argparse, json, os, statistics, sys, time, warnings

import torch
import flwr as fl
from flwr.common import ndarrays_to_parameters

p = argparse.ArgumentParser()
p.add_argument("--parts", required=True)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--cpus", type=int, default=2)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--batch", type=int, default=32)
a = p.parse_args()
warnings.filterwarnings("ignore")

# The client side lives in bench/flower_client.py, which Ray's workers import (see its
# docstring); they inherit this environment.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
os.environ["FLOWER_PARTS"] = os.path.abspath(a.parts)
os.environ["FLOWER_LR"] = str(a.lr)
os.environ["FLOWER_BATCH"] = str(a.batch)
from flower_client import client_fn, get, load, net, put  # noqa: E402

XT, YT = load("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
with open(a.parts) as f:
    n = len(json.load(f))


times = {"start": None, "marks": []}


class Timed(fl.server.strategy.FedAvg):
    def configure_fit(self, server_round, parameters, client_manager):
        if times["start"] is None:
            times["start"] = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        times["marks"].append(time.perf_counter())
        return out


final = {}


def evaluate(server_round, parameters, config):
    if server_round != a.rounds:
        return None
    m = net()
    put(m, parameters)
    with torch.no_grad():
        acc = (m(XT).argmax(1) == YT).float().mean().item()
    final["accuracy"] = acc
    return 0.0, {"accuracy": acc}


torch.manual_seed(1)
strategy = Timed(
    fraction_fit=1.0,
    fraction_evaluate=0.0,
    min_fit_clients=n,
    min_available_clients=n,
    evaluate_fn=evaluate,
    on_fit_config_fn=lambda r: {"round": r},
    initial_parameters=ndarrays_to_parameters(get(net())),
)
t0 = time.perf_counter()
fl.simulation.start_simulation(
    client_fn=client_fn,
    num_clients=n,
    config=fl.server.ServerConfig(num_rounds=a.rounds),
    strategy=strategy,
    client_resources={"num_cpus": 1},
    ray_init_args={"num_cpus": a.cpus, "include_dashboard": False, "log_to_driver": False},
)
total = time.perf_counter() - t0
marks = [times["start"]] + times["marks"]
rounds = [b - a_ for a_, b in zip(marks, marks[1:])]
print(json.dumps({
    "flwr": fl.__version__,
    "clients": n,
    "round_seconds": rounds,
    "round_seconds_median": statistics.median(rounds),
    "total_seconds": total,
    "accuracy": final.get("accuracy"),
}))
