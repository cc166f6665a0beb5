"""Classifier alignment for class-incremental heads: re-fit every row on class-wise feature Gaussians.

A class-incremental head trained task by task leans toward the classes it saw last: the newest
rows were trained on all of their images, the older ones only on a small replay memory. Slow
Learner with Classifier Alignment (SLCA, Zhang et al., ICCV 2023) stores each class's feature mean
and covariance at the end of its task, and after every task re-fits the classifier on features
sampled from those Gaussians, the same number for every class seen, so no class is favoured by how
many of its images are still around.

`ClassStatistics` keeps the Gaussians (tensors only, so they checkpoint like the rest of a run);
`align_classifier` does the re-fit, through `TaskHeads.fit` (logistic regression by L-BFGS from the
current rows). The statistics are taken with the model as it is when the class's task ends; later
tasks move the features of old classes, and stale means mislead the re-fit wherever they move
much: `ClassStatistics.shift` and `ClassStatistics.transform` let a caller correct them
(`EMTALController.compensate_drift` measures the drift on the replay memory; `fit_drift_map` fits
one linear map of it, which moves the covariances too).
"""

from __future__ import annotations

import torch

from cmtl.heads import TaskHeads

# Default covariance shrinkage toward its mean variance (`strategy.alignment_shrinkage`): a class's
# covariance comes from a few hundred images (60 in the dev streams) in hundreds of dimensions, so it
# is singular without any. How much is a tuning matter: the dev class-incremental configs take 0.01
# with 4096 samples per class (benchmarks/RESULTS.md, session 20)
SHRINKAGE = 0.1
# How a class's spread is kept: "full" its own D x D covariance (D^2 numbers per class: 2.4 MB at
# 768 features) or "shared" one covariance pooled over all classes' within-class scatter (D^2 once:
# linear discriminant analysis' assumption). Per-class variances alone (a diagonal covariance) were
# tried and dropped: pre-trained features are strongly correlated, samples that ignore it lie where
# no real feature does, and the re-fitted head lost 18 points (benchmarks/RESULTS.md, session 19).
COVARIANCES = ("full", "shared")
# How old classes' statistics follow their features' drift (`strategy.alignment_drift_map`):
# "linear" fits one map x -> x W + b to all memory samples' features before and after the task (as
# Learnable Drift Compensation, Gomez-Villa et al. 2024, does on the new task's images), moves each
# covariance to W^T S W and each mean to its memory samples' new mean plus W of its old offset from
# them (so a class's own shift is kept exactly); "shift" moves each class's mean by its memory
# samples' mean change alone (semantic drift compensation, Yu et al. 2020). On the dev streams the
# map gains 0.2-0.3 points at 60 images per class and 4-6 at 500 (benchmarks/RESULTS.md, session 21)
DRIFT_MAPS = ("linear", "shift")
# Ridge of that map toward the identity, as a multiple of the memory features' mean variance: a
# memory of a few hundred samples in hundreds of dimensions pins down few directions of W. 0.1 was
# chosen on the dev streams' validation splits over 1.0 (benchmarks/RESULTS.md, session 21)
DRIFT_RIDGE = 0.1


def check_drift_map(drift_map: str) -> str:
    """`drift_map` if it is one of `DRIFT_MAPS`, else ValueError naming the valid ones."""
    if drift_map not in DRIFT_MAPS:
        raise ValueError(f"drift map {drift_map!r} is unknown; valid: {', '.join(DRIFT_MAPS)}")
    return drift_map


@torch.no_grad()
def fit_drift_map(
    before: torch.Tensor, after: torch.Tensor, ridge: float = DRIFT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """W (D x D) and b (D) of the ridge least-squares map `after ~ before @ W + b`, pulled toward the
    identity: minimises |after - before W - b|^2 + l |W - I|^2 with l = `ridge` x the mean variance
    of `before` x N (float64; N x D inputs, N >= 2)."""
    if before.ndim != 2 or before.shape != after.shape or len(before) < 2:
        raise ValueError(
            f"before {tuple(before.shape)} / after {tuple(after.shape)}: need the same N x D, N >= 2"
        )
    if ridge <= 0:
        raise ValueError(f"ridge={ridge} must be > 0")
    x, y = before.double(), after.double()
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    lam = ridge * max(float(torch.diagonal(gram).mean()), 1e-12)
    weight = torch.linalg.solve(gram + lam * eye, xc.T @ yc + lam * eye)
    return weight, ym - xm @ weight


def check_covariance(covariance: str) -> str:
    """`covariance` if it is one of `COVARIANCES`, else ValueError naming the valid ones."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance {covariance!r} is unknown; valid: {', '.join(COVARIANCES)}")
    return covariance


class ClassStatistics:
    """Feature mean and (shrunk) covariance per class, by global class index.

    `covariance` (see `COVARIANCES`) sets what `covs` holds: C x D x D per-class (shrunk)
    covariances, or the D x D sum of every class's within-class scatter, from which one shrunk
    covariance shared by every class is taken. Shared statistics pool every update's scatter (a
    class updated twice counts twice in it; its mean is replaced).
    """

    def __init__(self, shrinkage: float = SHRINKAGE, covariance: str = "full"):
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage} must be in [0, 1]")
        self.shrinkage = shrinkage
        self.covariance = check_covariance(covariance)
        self.classes = torch.zeros(0, dtype=torch.long)
        self.means = torch.zeros(0, 0)
        # full: C x D x D (float32, as the means); shared: the D x D sum of every class's scatter (float64)
        self.covs = torch.zeros(0, 0, 0) if covariance == "full" else torch.zeros(0, 0, dtype=torch.float64)
        self.scatter_dof = torch.zeros((), dtype=torch.float64)  # shared: degrees of freedom pooled so far

    def __len__(self) -> int:
        return len(self.classes)

    def _shrink(self, cov: torch.Tensor) -> torch.Tensor:
        iso = torch.diagonal(cov).mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        return (1 - self.shrinkage) * cov + self.shrinkage * iso

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Store (or replace) the statistics of every class in `labels`; returns those classes.

        A class needs at least two samples (one gives no covariance); classes with fewer are skipped.
        """
        features, labels = features.detach().double().cpu(), labels.detach().long().cpu()
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(
                f"features {tuple(features.shape)} / labels {tuple(labels.shape)}: need N x D and N"
            )
        if len(self) and features.shape[1] != self.means.shape[1]:
            raise ValueError(
                f"features have {features.shape[1]} dimensions, the statistics {self.means.shape[1]}"
            )
        done = []
        for c in torch.unique(labels).tolist():
            x = features[labels == c]
            if len(x) < 2:
                continue
            mean = x.mean(0)
            scatter = (x - mean).T @ (x - mean)
            if self.covariance == "shared":
                self.covs = scatter if not self.covs.numel() else self.covs + scatter
                self.scatter_dof = self.scatter_dof + (len(x) - 1)
                cov = None
            else:
                cov = self._shrink(scatter / (len(x) - 1)).float()
            self._put(c, mean.float(), cov)
            done.append(c)
        return done

    def _put(self, c: int, mean: torch.Tensor, cov: torch.Tensor | None) -> None:
        """Store class `c`'s mean and, unless None (shared statistics), its own covariance."""
        hit = (self.classes == c).nonzero(as_tuple=True)[0]
        if len(hit):
            self.means[hit[0]] = mean
            if cov is not None:
                self.covs[hit[0]] = cov
            return
        if not len(self):
            self.means = mean.new_zeros(0, len(mean))
            if cov is not None:
                self.covs = cov.new_zeros(0, *cov.shape)
        self.classes = torch.cat([self.classes, torch.tensor([c])])
        self.means = torch.cat([self.means, mean[None]])
        if cov is not None:
            self.covs = torch.cat([self.covs, cov[None]])

    def shared_covariance(self) -> torch.Tensor:
        """The shrunk pooled within-class covariance ("shared" statistics only)."""
        if self.covariance != "shared" or not len(self):
            raise ValueError(f"no shared covariance in {self.covariance!r} statistics of {len(self)} classes")
        return self._shrink(self.covs / self.scatter_dof.clamp(min=1.0))

    @torch.no_grad()
    def shift(self, c: int, delta: torch.Tensor) -> int:
        """Move class `c`'s mean by `delta` (its features drifted); 1, or 0 if `c` has no statistics."""
        hit = (self.classes == c).nonzero(as_tuple=True)[0]
        if not len(hit):
            return 0
        self.means[hit[0]] += delta.to(self.means)
        return 1

    @torch.no_grad()
    def transform(self, weight: torch.Tensor, means: torch.Tensor) -> None:
        """The features moved linearly, x -> x @ `weight` + (a shift per class): every covariance
        (or the shared scatter) becomes W^T S W, and the means become `means` (C x D, in the order
        of `classes`)."""
        if means.shape != self.means.shape or weight.shape != (self.means.shape[1],) * 2:
            raise ValueError(
                f"means {tuple(means.shape)} / weight {tuple(weight.shape)} do not fit statistics with "
                f"means {tuple(self.means.shape)}"
            )
        w = weight.double()
        self.means = means.to(self.means)
        if self.covariance == "shared":
            self.covs = w.T @ self.covs @ w
            return
        # one class at a time: all C x D x D in float64 would be 0.9 GB at 200 classes of 768
        for i in range(len(self.covs)):
            self.covs[i] = (w.T @ self.covs[i].double() @ w).to(self.covs.dtype)

    @torch.no_grad()
    def sample(
        self, per_class: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` features drawn from every stored class's Gaussian, and their classes."""
        if per_class < 1:
            raise ValueError(f"per_class={per_class} must be >= 1")
        dim = self.means.shape[1]
        # one class at a time into a float32 result: drawing every class at once in float64 held
        # three C x per_class x D copies (5 GB each at 200 classes of 768 and 4096 samples)
        x = torch.empty(len(self), per_class, dim)
        shared = torch.linalg.cholesky(self.shared_covariance()) if self.covariance == "shared" else None
        for i in range(len(self)):
            # shrinkage > 0 keeps the covariances positive definite
            chol = shared if shared is not None else torch.linalg.cholesky(self.covs[i].double())
            z = torch.randn(per_class, dim, generator=generator, dtype=torch.float64)
            x[i] = self.means[i].double() + z @ chol.T
        return x.reshape(-1, dim), self.classes.repeat_interleave(per_class)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"classes": self.classes, "means": self.means, "covs": self.covs}
        if self.covariance == "shared":
            state["scatter_dof"] = self.scatter_dof
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        classes, means, covs = state["classes"], state["means"], state["covs"]
        shared = self.covariance == "shared"
        if shared:
            ok = covs.ndim == 2 and "scatter_dof" in state
        else:
            ok = covs.ndim == 3 and covs.shape[:1] == classes.shape
        if not ok or means.shape[:1] != classes.shape:
            raise ValueError(
                f"statistics of {len(classes)} classes with means {tuple(means.shape)} and covariances "
                f"{tuple(covs.shape)} do not fit {self.covariance!r} statistics (alignment_covariance)"
            )
        self.classes, self.means = classes.long(), means.float()
        if shared:
            self.covs, self.scatter_dof = covs.double(), state["scatter_dof"].double()
        else:
            self.covs = covs.float()


def align_classifier(
    heads: TaskHeads,
    stats: ClassStatistics,
    per_class: int = 256,
    generator: torch.Generator | None = None,
    max_iter: int = 100,
) -> bool:
    """Re-fit every row of a class-incremental head on `per_class` samples of each class's Gaussian.

    Starts from the current rows (`TaskHeads.fit`). Returns False (nothing changed) for a
    task-incremental head, fewer than two classes with statistics, or a fit that did not stay finite.
    """
    if heads.mode != "cil" or len(stats) < 2:
        return False
    n = heads.num_classes
    if int(stats.classes.max()) >= n:
        raise ValueError(f"statistics for class {int(stats.classes.max())}, but the head has {n} classes")
    x, y = stats.sample(per_class, generator)
    weight = next(heads.parameters())
    return heads.fit(x.to(weight), y.to(weight.device), max_iter=max_iter, tasks=range(0, len(heads.heads)))
