"""Breast-cancer example, step 1 and the centralised baselines.

Splits scikit-learn's copy of the Wisconsin diagnostic breast-cancer table
(sklearn/datasets/data/breast_cancer.csv: a first line of counts and class names, then 30
features and a 0/1 label, 0 = malignant) into a training and a test file of the same format
(seeded, stratified 80/20), then trains two centralised baselines on the pooled training
table, standardised with its own mean and standard deviation:
  - scikit-learn's LogisticRegression (default settings);
  - the federation's 30-16-16-2 MLP in PyTorch (SGD, lr 0.05, batch 16, 60 epochs).
Prints one JSON line per baseline (test accuracy and AUC of class "benign", label 1).

Usage: prepare.py OUT_DIR
"""
import json
import os
import sys

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
src = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "breast_cancer.csv")
with open(src) as f:
    first = f.readline()
    rows = [line for line in f if line.strip()]
labels = np.array([int(r.rsplit(",", 1)[1]) for r in rows])
train_idx, test_idx = train_test_split(
    np.arange(len(rows)), test_size=0.2, random_state=7, stratify=labels
)
for name, idx in (("train.csv", train_idx), ("test.csv", test_idx)):
    with open(os.path.join(out, name), "w") as f:
        f.write(f"{len(idx)},30,malignant,benign\n")
        f.writelines(rows[i] for i in idx)

data = np.array([[float(v) for v in r.strip().split(",")] for r in rows])
x, y = data[:, :30], data[:, 30].astype(int)
mean, std = x[train_idx].mean(0), x[train_idx].std(0)
xtr, xte = (x[train_idx] - mean) / std, (x[test_idx] - mean) / std
ytr, yte = y[train_idx], y[test_idx]

lr = LogisticRegression().fit(xtr, ytr)
p = lr.predict_proba(xte)[:, 1]
print(json.dumps({"baseline": "centralised LogisticRegression (scikit-learn)",
                  "accuracy": accuracy_score(yte, p > 0.5), "auc": roc_auc_score(yte, p)}))

torch.manual_seed(7)
net = torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                          torch.nn.ReLU(), torch.nn.Linear(16, 2))
opt = torch.optim.SGD(net.parameters(), lr=0.05)
xt, yt = torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr)
g = torch.Generator().manual_seed(7)
for _ in range(60):
    perm = torch.randperm(len(xt), generator=g)
    for i in range(0, len(xt), 16):
        b = perm[i:i + 16]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
        opt.step()
with torch.no_grad():
    p = torch.softmax(net(torch.tensor(xte, dtype=torch.float32)), -1)[:, 1].numpy()
print(json.dumps({"baseline": "centralised MLP 30-16-16-2 (PyTorch)",
                  "accuracy": accuracy_score(yte, p > 0.5), "auc": roc_auc_score(yte, p)}))
