"""Classifier heads: one linear head per task (task-incremental) or one growing head (class-incremental).

Both keep one `nn.Linear` per task in a `ModuleList`, so adding a task never replaces existing
parameters (an optimizer holding them stays valid). In class-incremental mode the per-task chunks
are concatenated: that is exactly one head whose rows grow as classes arrive.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("til", "cil")
HEAD_INITS = ("random", "prototype", "probe")  # see init_from_means, fit


def check_head_init(head_init: str) -> str:
    """`head_init` if it is one of `HEAD_INITS`, else ValueError naming the valid ones."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init {head_init!r} is unknown; valid: {', '.join(HEAD_INITS)}")
    return head_init


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

    def task_span(self, tasks: range | None) -> range:
        """The heads `tasks` (default: the newest), checked to be a non-empty run of existing heads."""
        if tasks is None:
            tasks = range(len(self.heads) - 1, len(self.heads))
        if (
            not self.heads
            or len(tasks) == 0
            or tasks.step != 1
            or tasks.start < 0
            or tasks.stop > len(self.heads)
        ):
            raise ValueError(
                f"tasks {tasks!r} is not a run of existing heads; valid: within range(0, {len(self.heads)})"
            )
        if self.mode == "til" and len(tasks) != 1:
            raise ValueError(
                f"task-incremental heads are separate classifiers; tasks {tasks!r} must be one head"
            )
        return tasks

    def _rows(self, tasks: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and biases of heads `tasks`, their rows stacked in class order (copies)."""
        hs = [self.heads[t] for t in tasks]
        return torch.cat([h.weight.detach() for h in hs]), torch.cat([h.bias.detach() for h in hs])

    @torch.no_grad()
    def _set_rows(self, tasks: range, weight: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor) -> None:
        """Write `weight[rows]`, `bias[rows]` (indices into the stacked rows of `tasks`) into the heads."""
        start = 0
        for t in tasks:
            h = self.heads[t]
            mine = rows[(rows >= start) & (rows < start + h.out_features)]
            h.weight[mine - start] = weight[mine].to(h.weight)
            h.bias[mine - start] = bias[mine].to(h.bias)
            start += h.out_features

    @torch.no_grad()
    def init_from_means(
        self, means: torch.Tensor, present: torch.Tensor, margin: float = 2.0, tasks: range | None = None
    ) -> bool:
        """Start heads `tasks` (default: the newest) as a nearest-class-mean classifier of their classes.

        `means` (n_classes x in_features) are the mean pre-logit features of the classes of those
        heads, in order (several heads only in class-incremental mode, where they are one classifier:
        joint training starts all of them at once); `present` marks the rows that had samples. Row c
        becomes `tau * (mu_c - m)` with bias `-tau * (m . (mu_c - m) + |mu_c - m|^2 / 2)` (m: mean of
        the present means): the logits are `-tau |x - mu_c|^2 / 2` up to a term shared by all classes,
        a prototype classifier, and training starts from there. `tau` makes the mean margin at the
        class means equal `margin`, whatever the features' scale.
        Rows without samples keep their random start. Returns False (nothing changed) when fewer than
        two classes are present or their means coincide.
        """
        tasks = self.task_span(tasks)
        weight, bias = self._rows(tasks)
        if means.shape != weight.shape or present.shape != (weight.shape[0],):
            raise ValueError(
                f"means {tuple(means.shape)} / present {tuple(present.shape)} do not fit heads {tasks!r} "
                f"({weight.shape[0]} x {weight.shape[1]})"
            )
        present = present.to(torch.bool).to(weight.device)
        if int(present.sum()) < 2:
            return False
        mu = means.to(weight)[present]
        m = mu.mean(dim=0)
        centred = mu - m
        # mean squared distance between two different class means: sum over pairs = 2k sum |mu_c - m|^2
        mean_sq = 2 * centred.pow(2).sum() / (mu.shape[0] - 1)
        if not bool(torch.isfinite(mean_sq)) or float(mean_sq) <= 0:
            return False
        tau = 2.0 * margin / mean_sq
        weight[present] = tau * centred
        bias[present] = -tau * (centred @ m + centred.pow(2).sum(dim=1) / 2)
        self._set_rows(tasks, weight, bias, present.nonzero(as_tuple=True)[0])
        return True

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        max_iter: int = 100,
        tasks: range | None = None,
        old: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> bool:
        """Fit heads `tasks` (default: the newest) by logistic regression on fixed features (a linear probe).

        `features` (N x in_features) and `labels` (N, rows 0..n-1 of those heads taken in order, as
        in `init_from_means`) are the training images of their classes. The rows of the classes
        present are fitted by L-BFGS from where they are (the prototype start, say) to the minimum of
        the mean cross-entropy plus `|W|^2 / (2N)` (scikit-learn's `LogisticRegression(C=1)`; the
        bias is not penalised), so training starts from a converged probe (LP-FT, Kumar et al. 2022)
        rather than from a head that a few steps leave half-trained. Rows of absent classes are left
        as they are. Returns False (nothing changed) when fewer than two classes are present or the
        fit does not stay finite.

        `old` (class-incremental only): `(features, classes)` of stored samples of the classes
        before heads `tasks` (a replay memory). Their rows stay as they are and join the softmax, so
        the new rows are fitted against the old classes too: fitted on the new classes alone, their
        logits are on a scale of their own and the classifier leans to whichever side is larger.
        """
        tasks = self.task_span(tasks)
        start_w, start_b = self._rows(tasks)
        old_x, old_y, old_w, old_b = self._old_rows(tasks, old, start_w)
        labels = labels.long().to(start_w.device)
        if features.shape[0] != labels.shape[0] or features.shape[1:] != (start_w.shape[1],):
            raise ValueError(
                f"features {tuple(features.shape)} / labels {tuple(labels.shape)} do not fit heads "
                f"{tasks!r} ({start_w.shape[0]} x {start_w.shape[1]})"
            )
        present = torch.unique(labels)
        if len(present) < 2:
            return False
        if int(present.min()) < 0 or int(present.max()) >= start_w.shape[0]:
            raise ValueError(f"labels must be rows 0..{start_w.shape[0] - 1} of heads {tasks!r}")
        # old classes' samples take the first columns (their rows, fixed), the new ones follow
        x = torch.cat([old_x, features.detach().to(start_w)])
        target = torch.cat([old_y, old_w.shape[0] + torch.searchsorted(present, labels)])
        weight = start_w[present].clone().requires_grad_(True)
        bias = start_b[present].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
        fixed = x @ old_w.T + old_b

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(torch.cat([fixed, x @ weight.T + bias], dim=1), target)
            loss = loss + weight.pow(2).sum() / (2 * x.shape[0])
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
            return False
        start_w[present] = weight.detach()
        start_b[present] = bias.detach()
        self._set_rows(tasks, start_w, start_b, present)
        return True

    def _old_rows(
        self, tasks: range, old: tuple[torch.Tensor, torch.Tensor] | None, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`fit`'s old samples and the rows of the classes before `tasks`: (x, y, weight, bias)."""
        dim = like.shape[1]
        if old is None or len(old[1]) == 0:
            no_rows = like.new_zeros(0, dim)
            return no_rows, torch.zeros(0, dtype=torch.long, device=like.device), no_rows, like.new_zeros(0)
        if self.mode != "cil":
            raise ValueError("old samples join the fit only in class-incremental mode (one classifier)")
        x, y = old[0].detach().to(like), old[1].long().to(like.device)
        if x.shape[0] != y.shape[0] or x.shape[1:] != (dim,):
            raise ValueError(
                f"old features {tuple(x.shape)} / classes {tuple(y.shape)} do not fit {dim} features"
            )
        n_old = sum(self.classes_per_task[: tasks.start])
        if int(y.min()) < 0 or int(y.max()) >= n_old:
            bad = int(y[(y < 0) | (y >= n_old)][0])
            raise ValueError(
                f"old class {bad} is not one of the classes before heads {tasks!r} (0..{n_old - 1})"
            )
        weight, bias = self._rows(range(0, tasks.start))
        return x, y, weight.to(like), bias.to(like)

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
