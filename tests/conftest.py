import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def _new_rows_gradient(heads, x, y):
    """Gradient norm, in the newest task's rows of class-incremental `heads` (one classifier), of the
    cross-entropy over every class + |W_new|^2 / (2N): it vanishes where those rows are a converged
    probe fitted with the older rows held fixed."""
    rows = heads.heads
    old_w = torch.cat([h.weight.detach() for h in rows[:-1]])
    old_b = torch.cat([h.bias.detach() for h in rows[:-1]])
    w = rows[-1].weight.detach().clone().requires_grad_(True)
    b = rows[-1].bias.detach().clone().requires_grad_(True)
    logits = torch.cat([x @ old_w.T + old_b, x @ w.T + b], dim=1)
    loss = torch.nn.functional.cross_entropy(logits, y) + w.pow(2).sum() / (2 * len(y))
    return float(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [w, b])]).norm())


@pytest.fixture
def new_rows_gradient():
    """`_new_rows_gradient`, for the tests of class-incremental probe heads."""
    return _new_rows_gradient
