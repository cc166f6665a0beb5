"""Classifier heads: one linear head per task (task-incremental) or one growing head (class-incremental).

Both keep one `nn.Linear` per task in a `ModuleList`, so adding a task never replaces existing
parameters (an optimizer holding them stays valid). In class-incremental mode the per-task chunks
are concatenated: that is exactly one head whose rows grow as classes arrive.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("til", "cil")
HEAD_INITS = ("random", "prototype", "probe")  # see init_newest_from_means, fit_newest
# fills logit columns a task's head does not have when a batch mixes tasks of different widths
PAD_LOGIT = -1e4


class TaskHeads(nn.Module):
    """Per-task linear heads (`mode="til"`) or one class-incremental head (`mode="cil"`)."""

    def __init__(self, in_features: int, mode: str = "til"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown head mode {mode!r}; valid: {', '.join(MODES)}")
        self.in_features = in_features
        self.mode = mode
        self.heads = nn.ModuleList()

    @property
    def classes_per_task(self) -> list[int]:
        return [h.out_features for h in self.heads]

    @property
    def num_classes(self) -> int:
        """Output width: all classes so far (CIL) or the widest task head (TIL)."""
        widths = self.classes_per_task
        return (sum(widths) if self.mode == "cil" else max(widths)) if widths else 0

    def add_task(self, num_classes: int) -> nn.Linear:
        """Append the head (or head rows) for a new task with `num_classes` classes."""
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        ref = next(self.parameters(), None)
        head = nn.Linear(self.in_features, num_classes, device=ref.device if ref is not None else None)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.heads.append(head)
        return head

    def forward(self, features: torch.Tensor, task_labels: torch.Tensor | int | None = None) -> torch.Tensor:
        if not self.heads:
            raise RuntimeError("the model has no task yet; call add_task(num_classes) first")
        if self.mode == "cil":
            return torch.cat([h(features) for h in self.heads], dim=-1)
        if task_labels is None:
            if len(self.heads) == 1:
                return self.heads[0](features)
            raise ValueError(
                f"a task-incremental model with {len(self.heads)} tasks needs task_labels "
                f"(0..{len(self.heads) - 1})"
            )
        if isinstance(task_labels, int):
            return self._head(task_labels)(features)
        task_labels = task_labels.to(features.device)
        tasks = torch.unique(task_labels).tolist()
        if len(tasks) == 1:
            return self._head(int(tasks[0]))(features)
        out = features.new_full((features.shape[0], self.num_classes), PAD_LOGIT)
        for t in tasks:
            idx = (task_labels == t).nonzero(as_tuple=True)[0]
            logits = self._head(int(t))(features[idx])
            out[idx, : logits.shape[1]] = logits
        return out

    def _head(self, task: int) -> nn.Linear:
        if not 0 <= task < len(self.heads):
            raise ValueError(f"task label {task} has no head; valid: 0..{len(self.heads) - 1}")
        return self.heads[task]

    @torch.no_grad()
    def init_newest_from_means(self, means: torch.Tensor, present: torch.Tensor, margin: float = 2.0) -> bool:
        """Start the newest head as a nearest-class-mean classifier of its classes' mean features.

        `means` (n_classes x in_features) are the mean pre-logit features of the newest head's
        classes, `present` marks the rows that had samples. Row c becomes `tau * (mu_c - m)` with bias
        `-tau * (m . (mu_c - m) + |mu_c - m|^2 / 2)` (m: mean of the present means): the logits are
        `-tau |x - mu_c|^2 / 2` up to a term shared by all classes, a prototype classifier, and
        training starts from there. `tau` makes the mean margin at the class means equal `margin`,
        whatever the features' scale.
        Rows without samples keep their random start. Returns False (nothing changed) when fewer than
        two classes are present or their means coincide.
        """
        head = self.heads[-1]
        if means.shape != head.weight.shape or present.shape != (head.out_features,):
            raise ValueError(
                f"means {tuple(means.shape)} / present {tuple(present.shape)} do not fit the newest "
                f"head ({head.out_features} x {head.in_features})"
            )
        present = present.to(torch.bool)
        if int(present.sum()) < 2:
            return False
        mu = means[present].to(head.weight)
        m = mu.mean(dim=0)
        centred = mu - m
        # mean squared distance between two different class means: sum over pairs = 2k sum |mu_c - m|^2
        mean_sq = 2 * centred.pow(2).sum() / (mu.shape[0] - 1)
        if not bool(torch.isfinite(mean_sq)) or float(mean_sq) <= 0:
            return False
        tau = 2.0 * margin / mean_sq
        head.weight[present] = tau * centred
        head.bias[present] = -tau * (centred @ m + centred.pow(2).sum(dim=1) / 2)
        return True

    def fit_newest(self, features: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> bool:
        """Fit the newest head by logistic regression on fixed features (a linear probe).

        `features` (N x in_features) and `labels` (N, the newest head's own rows 0..n-1) are the
        task's training images as the task starts. The rows of the classes present are fitted by
        L-BFGS from where they are (the prototype start, say) to the minimum of the mean
        cross-entropy plus `|W|^2 / (2N)` (scikit-learn's `LogisticRegression(C=1)`; the bias is not
        penalised), so training starts from a converged probe (LP-FT, Kumar et al. 2022) rather than
        from a head that a few steps leave half-trained. Rows of absent classes are left as they are.
        Returns False (nothing changed) when fewer than two classes are present or the fit does not
        stay finite.
        """
        head = self.heads[-1]
        labels = labels.long().to(head.weight.device)
        if features.shape[0] != labels.shape[0] or features.shape[1:] != (head.in_features,):
            raise ValueError(
                f"features {tuple(features.shape)} / labels {tuple(labels.shape)} do not fit the newest "
                f"head ({head.out_features} x {head.in_features})"
            )
        present = torch.unique(labels)
        if len(present) < 2:
            return False
        if int(present.min()) < 0 or int(present.max()) >= head.out_features:
            raise ValueError(f"labels must be the newest head's rows 0..{head.out_features - 1}")
        x = features.detach().to(head.weight)
        target = torch.searchsorted(present, labels)  # each label's position among the rows present
        weight = head.weight.detach()[present].clone().requires_grad_(True)
        bias = head.bias.detach()[present].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(x @ weight.T + bias, target)
            loss = loss + weight.pow(2).sum() / (2 * x.shape[0])
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
            return False
        with torch.no_grad():
            head.weight[present] = weight.detach()
            head.bias[present] = bias.detach()
        return True

    @torch.no_grad()
    def align_newest(self) -> float:
        """Weight aligning (Zhao et al., CVPR 2020) for class-incremental heads.

        Scales the newest task's rows (weights and biases) so their mean weight norm equals that
        of the older classes' rows, countering the bias of a head toward the classes it was last
        trained on. Returns the factor applied (1.0 when there is nothing to align).
        """
        if self.mode != "cil" or len(self.heads) < 2:
            return 1.0
        old = torch.cat([h.weight for h in self.heads[:-1]]).norm(dim=1).mean()
        new_head = self.heads[-1]
        new = new_head.weight.norm(dim=1).mean()
        if not bool(new > 0):
            return 1.0
        gamma = float(old / new)
        new_head.weight.mul_(gamma)
        new_head.bias.mul_(gamma)
        return gamma

    def merged_cil_head(self) -> nn.Linear:
        """The class-incremental chunks as one `nn.Linear` (for snapshots and plain inference)."""
        w = torch.cat([h.weight for h in self.heads])
        b = torch.cat([h.bias for h in self.heads])
        head = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        return head
