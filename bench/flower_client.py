"""The client side of bench/flower_sim.py, in a module of its own so that Ray workers
import it (cloudpickle sends functions of an importable module by reference). Defined in
the driver's `__main__` instead, every client function was pickled by value with the
globals it uses, i.e. the whole 188 MB training set, for every client call: that, not
training, was most of a round's time. Each worker process now loads the data once and
keeps it.

Settings come from the environment flower_sim.py sets before Ray starts (workers inherit
it): FLOWER_PARTS (JSON list of index lists), FLOWER_LR, FLOWER_BATCH."""
import gzip, json, os

import torch
import flwr as fl

D = "/usr/share/datasets/fashion-mnist/"
_cache = {}


def load(images, labels):
    imgs = gzip.open(D + images).read()[16:]
    labs = gzip.open(D + labels).read()[8:]
    n = len(labs)
    x = torch.frombuffer(bytearray(imgs), dtype=torch.uint8).view(n, 784).float() / 255.0
    y = torch.frombuffer(bytearray(labs), dtype=torch.uint8).long()
    return x, y


def train_data():
    """The training set and the partition, loaded once per process."""
    if "train" not in _cache:
        _cache["train"] = load("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
        with open(os.environ["FLOWER_PARTS"]) as f:
            _cache["parts"] = json.load(f)
    return _cache["train"], _cache["parts"]


def net():
    return torch.nn.Sequential(
        torch.nn.Linear(784, 200), torch.nn.ReLU(),
        torch.nn.Linear(200, 200), torch.nn.ReLU(),
        torch.nn.Linear(200, 10),
    )


def get(m):
    return [v.detach().cpu().numpy() for v in m.state_dict().values()]


def put(m, arrays):
    sd = m.state_dict()
    m.load_state_dict({k: torch.tensor(v) for k, v in zip(sd.keys(), arrays)})


class Client(fl.client.NumPyClient):
    def __init__(self, cid):
        torch.set_num_threads(1)
        (x, y), parts = train_data()
        idx = torch.tensor(parts[cid])
        self.x, self.y = x[idx], y[idx]
        self.m = net()
        self.lr = float(os.environ.get("FLOWER_LR", "0.05"))
        self.batch = int(os.environ.get("FLOWER_BATCH", "32"))

    def fit(self, parameters, config):
        put(self.m, parameters)
        opt = torch.optim.SGD(self.m.parameters(), lr=self.lr)
        g = torch.Generator().manual_seed(int(config.get("round", 0)))
        order = torch.randperm(len(self.y), generator=g)
        for s in range(0, len(order), self.batch):
            b = order[s : s + self.batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.m(self.x[b]), self.y[b])
            loss.backward()
            opt.step()
        return get(self.m), len(self.y), {}


def client_fn(context):
    cid = int(context.node_config["partition-id"])
    return Client(cid).to_client()
