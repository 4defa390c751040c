"""Reads a federated model back into PyTorch and measures its test accuracy.

    .venv/bin/python examples/torchscript/check.py model.pt runs/x/model.safetensors [N]

Loads the TorchScript module, replaces its parameters with the safetensors file's (by
name, strictly: every parameter, nothing else), and scores the first N (default 2000)
Fashion-MNIST test images as dpfl reads them (pixels / 255). Prints one JSON line. The
safetensors format is read directly (8-byte header size, JSON header, raw little-endian
tensors), so only torch is needed.
"""
import gzip
import json
import struct
import sys

import torch

FMNIST = "/usr/share/datasets/fashion-mnist"


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        start, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[base + start : base + end]), dtype=torch.float32)
        out[name] = t.reshape(info["shape"])
    return out


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def main():
    module_path, weights_path = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    m = torch.jit.load(module_path)
    weights = load_safetensors(weights_path)
    names = {k for k, _ in m.named_parameters()}
    if names != set(weights):
        raise SystemExit(f"parameter names differ: module {sorted(names)}, file {sorted(weights)}")
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(weights[k])
    m.eval()
    x = idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:n].reshape(n, -1).float() / 255.0
    y = idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")[:n].long()
    with torch.no_grad():
        pred = m(x).argmax(-1)
    correct = int((pred == y).sum())
    print(json.dumps({"examples": n, "correct": correct, "accuracy": correct / n}))


if __name__ == "__main__":
    main()
