"""PyTorch baseline for dpfl-bench: the same local training loop as dpfl's tch client
(784-200-200-10 MLP, ReLU, SGD lr 0.05, batch 32, one epoch over the first 6,000
Fashion-MNIST training images, seeded shuffle, index_select batches), on the given device
(cpu with the given number of threads, or cuda). Prints one JSON line with samples per
second (median of 5). On CUDA each timed epoch ends with the loss read back to the host, as
dpfl's ends with the delta, so no queued work is left out of the time."""
import argparse, gzip, json, statistics, time
import torch

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=1)
p.add_argument("--device", default="cpu")
a = p.parse_args()
dev = torch.device(a.device)
torch.set_num_threads(a.threads)
torch.manual_seed(0)
D = "/usr/share/datasets/fashion-mnist/"
imgs = gzip.open(D + "train-images-idx3-ubyte.gz").read()[16:]
labs = gzip.open(D + "train-labels-idx1-ubyte.gz").read()[8:]
n = 6000
x = torch.frombuffer(bytearray(imgs[: n * 784]), dtype=torch.uint8).view(n, 784).float() / 255.0
y = torch.frombuffer(bytearray(labs[:n]), dtype=torch.uint8).long()
x, y = x.to(dev), y.to(dev)
net = torch.nn.Sequential(
    torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10)
).to(dev)

def epoch():
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    perm = torch.randperm(n).to(dev)  # one copy an epoch, as dpfl's loop does
    for i in range(0, n, 32):
        idx = perm[i : i + 32]
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
    return loss.item()

epoch()
times = []
for _ in range(5):
    t = time.perf_counter()
    epoch()
    times.append(time.perf_counter() - t)
print(json.dumps({"threads": a.threads, "device": a.device, "samples_per_sec": n / statistics.median(times)}))
