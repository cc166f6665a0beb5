"""Core model invariants: MoEfication, fresh adapters, fading, exact consolidation, heads."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from cmtl.backbone import UnsafeCheckpointError, create_backbone, load_state_dict_file
from cmtl.lora import merge_is_cheaper
from cmtl.model import AdapterConfig, CMTLModel
from cmtl.moe import MoEMlp
from cmtl.moefy import balanced_kmeans, find_mlps

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_vit(**kw) -> VisionTransformer:
    return VisionTransformer(num_classes=0, **{**TINY, **kw}).eval()


def feats(vit, x):
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("num_experts", [1, 2, 4, 8, 16])
def test_moefy_preserves_function_and_balances(num_experts):
    vit = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    ref = feats(vit, x).detach()
    m = CMTLModel(vit, AdapterConfig(num_experts=num_experts, rank=2)).eval()
    assert (m.forward_features(x) - ref).abs().max() <= 1e-5
    for _, mlp in find_mlps(m.backbone):
        assign = balanced_kmeans(mlp.fc1.weight.detach().numpy(), num_experts)
        assert np.all(np.bincount(assign, minlength=num_experts) == mlp.fc1.out_features // num_experts)


def test_balanced_kmeans_deterministic_and_groups_similar_rows():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 16))
    pts = np.repeat(centres, 8, axis=0) + 0.01 * rng.standard_normal((32, 16))
    a, b = balanced_kmeans(pts, 4, seed=3), balanced_kmeans(pts, 4, seed=3)
    assert np.array_equal(a, b)
    # rows drawn around the same centre land in the same cluster
    for k in range(4):
        assert len(set(a[8 * k : 8 * k + 8])) == 1


def test_experts_must_divide_width():
    with pytest.raises(ValueError, match="num_experts=7 does not divide the MLP width 128"):
        CMTLModel(tiny_vit(), AdapterConfig(num_experts=7))


@pytest.mark.parametrize("attn_lora", [True, False])
@pytest.mark.parametrize("moe", [True, False])
def test_fresh_adapter_is_bit_identical(attn_lora, moe):
    m = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2, attn_lora=attn_lora, moe=moe)).eval()
    x = torch.randn(2, 3, 32, 32)
    m.add_task(3)
    before = m.forward_features(x).detach()
    m.add_task(4)  # a second, fresh adapter on top
    assert torch.equal(m.forward_features(x), before)


def _train_steps(model, x, steps=5):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=5e-2)
    tasks = torch.arange(x.shape[0]) % model.num_tasks
    for _ in range(steps):
        out = model(x, tasks if model.mode == "til" else None)
        loss = torch.nn.functional.cross_entropy(out, torch.zeros(x.shape[0], dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("mode", ["til", "cil"])
@pytest.mark.parametrize("attn_lora", [True, False])
def test_fade_then_consolidate_is_exact_plain_timm(mode, attn_lora):
    vit = tiny_vit()
    base = {k: v.clone() for k, v in vit.state_dict().items()}
    m = CMTLModel(vit, AdapterConfig(num_experts=4, rank=2, attn_lora=attn_lora), mode=mode)
    x = torch.randn(6, 3, 32, 32)
    m.add_task(3)
    m.add_task(2)
    m.train()
    _train_steps(m, x)
    m.eval()
    routed = m.forward_features(x).detach()
    m.set_fading(0.0)
    faded = m.forward_features(x).detach()
    base_vit = tiny_vit()
    base_vit.load_state_dict(base)
    # the adapted model must really differ from the base, or the equality below proves nothing
    assert (faded - feats(base_vit, x)).abs().max() > 1e-3
    assert (routed - faded).abs().max() > 0  # routers were active before fading
    logits = m(x, torch.arange(6) % 2 if mode == "til" else None).detach()
    backbone = m.consolidate()
    assert type(backbone) is VisionTransformer
    assert not any(mod.__module__.startswith("cmtl") for mod in backbone.modules())
    assert (m.forward_features(x) - faded).abs().max() <= 1e-4
    assert (m(x, torch.arange(6) % 2 if mode == "til" else None) - logits).abs().max() <= 1e-4
    fresh = tiny_vit()
    fresh.load_state_dict(backbone.state_dict(), strict=True)
    assert (feats(fresh, x) - faded).abs().max() <= 1e-4


def test_merging_before_the_matmul_is_chosen_by_token_count():
    # ViT-B/16 MLP (768 -> 3072, 16 experts): one 197-token image stays low-rank, a batch of 64 merges
    d, h, e = 768, 3072, 16
    assert not merge_is_cheaper(197, e * d + 2 * h + d, 2 * h * d)
    assert merge_is_cheaper(64 * 197, e * d + 2 * h + d, 2 * h * d)
    assert not merge_is_cheaper(197, d + 3 * d, 3 * d * d)  # qkv LoRA


@pytest.mark.parametrize("moe", [True, False])
def test_eval_forward_with_merged_weights_equals_the_low_rank_path(moe, monkeypatch):
    """In eval mode with enough tokens the adapters are added to the weights before the matmul (one
    matmul per layer); outputs and gradients must be those of the low-rank training path."""
    merged_calls = []
    real = MoEMlp._merged_weights
    monkeypatch.setattr(MoEMlp, "_merged_weights", lambda self: merged_calls.append(1) or real(self))
    torch.manual_seed(0)
    m = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2, moe=moe))
    m.add_task(3)
    m.add_task(2)
    for p in m.adapter_parameters() + [q for n, q in m.named_parameters() if "router" in n]:
        torch.nn.init.normal_(p, std=0.3)  # non-zero B and active routers, in both adapters
    if moe:
        m.set_fading(0.5, "task1")
    x = torch.randn(4, 3, 32, 32)
    probe = torch.randn(4, 32)  # not a squared norm: after the final LayerNorm its gradient is ~0

    def out_and_grads(train: bool):
        m.train(train)
        m.zero_grad()
        y = m.forward_features(x)
        (y * probe).sum().backward()
        return y.detach(), [p.grad.clone() for p in m.adapter_parameters()]

    y_train, g_train = out_and_grads(True)
    assert not merged_calls
    y_eval, g_eval = out_and_grads(False)
    assert len(merged_calls) == 2  # both MLPs took the merged path (68 tokens)
    assert (y_train - feats(tiny_vit(), x)).abs().max() > 1e-2  # the adapters do change the function
    assert (y_eval - y_train).abs().max() <= 1e-4 * y_train.abs().max()
    g_eval, g_train = torch.cat([g.flatten() for g in g_eval]), torch.cat([g.flatten() for g in g_train])
    assert g_train.abs().max() > 0
    assert (g_eval - g_train).abs().max() <= 1e-4 * g_train.abs().max()


def test_consolidate_refuses_unfaded_and_next_round_works():
    m = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2))
    m.add_task(2)
    with pytest.raises(RuntimeError, match="not faded"):
        m.consolidate()
    m.set_fading(0.0)
    m.consolidate()
    assert m.open_adapters == [] and m.merged_adapters == ["task0"]
    x = torch.randn(2, 3, 32, 32)
    before = m.forward_features(x).detach()
    m.add_task(2)  # re-MoEfied and a new adapter: still the same function
    assert (m.forward_features(x) - before).abs().max() <= 1e-5


def test_only_newest_adapter_and_heads_train():
    m = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2))
    m.add_task(2)
    first = {id(p) for p in m.adapter_parameters()}
    m.add_task(2)
    trainable = {id(p) for p in m.trainable_parameters()}
    assert first.isdisjoint(trainable)
    assert {id(p) for p in m.adapter_parameters()} <= trainable
    assert all(not p.requires_grad for n, p in m.backbone.named_parameters() if "base_layer" in n)


def test_fading_interpolates_gates():
    m = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2)).eval()
    m.add_task(2)
    for p in m.adapter_parameters():
        if p.dim() == 2 and p.shape[0] == 4:  # routers
            torch.nn.init.normal_(p, std=1.0)
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for a in (1.0, 0.5, 0.0):
        m.set_fading(a)
        outs.append(m.forward_features(x).detach())
    assert m.fading() == {"task0": 0.0}
    assert (outs[0] - outs[2]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="must be in"):
        m.set_fading(1.5)


def test_til_heads_select_by_task_and_pad_mixed_batches():
    m = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2), mode="til").eval()
    m.add_task(3)
    m.add_task(5)
    x = torch.randn(4, 3, 32, 32)
    assert m(x, 0).shape == (4, 3) and m(x, 1).shape == (4, 5)
    mixed = m(x, torch.tensor([0, 1, 0, 1]))
    assert mixed.shape == (4, 5)
    assert torch.allclose(mixed[0, :3], m(x[:1], 0)[0], atol=1e-6)
    assert torch.all(mixed[0, 3:] < -1e3)
    with pytest.raises(ValueError, match="needs task_labels"):
        m(x)
    with pytest.raises(ValueError, match="task label 2 has no head"):
        m(x, 2)


def test_cil_head_grows_and_keeps_old_rows():
    m = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2), mode="cil").eval()
    m.add_task(2)
    x = torch.randn(3, 3, 32, 32)
    old = m(x).detach()
    m.add_task(3)
    new = m(x)
    assert new.shape == (3, 5)
    assert torch.equal(new[:, :2], old)  # fresh adapter + old rows: unchanged
    assert torch.allclose(m.heads.merged_cil_head()(m.forward_features(x)), new, atol=1e-6)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, depth=2)),
        ("vit_small_patch16_224", dict(img_size=32, depth=1)),
        ("deit_tiny_patch16_224", dict(img_size=32, depth=1)),
    ],
)
def test_timm_models_roundtrip(name, kw):
    m = CMTLModel.from_timm(name, adapter=AdapterConfig(num_experts=4, rank=2), **kw).eval()
    m.add_task(2)
    x = torch.randn(1, 3, 32, 32)
    m.set_fading(0.0)
    y = m.forward_features(x).detach()
    vit = m.consolidate()
    fresh = timm.create_model(name, num_classes=0, **kw)
    fresh.load_state_dict(vit.state_dict(), strict=True)
    assert (feats(fresh.eval(), x) - y).abs().max() <= 1e-4


def test_local_checkpoint_loading(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10)
    sd = src.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        kw = dict(img_size=32, patch_size=4, depth=2)
        vit = create_backbone("vit_tiny_patch16_224", checkpoint=tmp_path / f, **kw)
        assert torch.equal(vit.blocks[0].mlp.fc1.weight, sd["blocks.0.mlp.fc1.weight"])


def test_pickle_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        load_state_dict_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_bad_backbone_options():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_backbone("vit_tiny_patch16_224", img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("vit_nope")


def test_vit_base_parameter_count_matches_emtal_scale():
    """ViT-B/16, E=16, r=4, attention LoRA: EMTAL reports about 1.2 M trainable parameters per task."""
    vit = VisionTransformer(num_classes=0)  # ViT-B/16 shapes
    m = CMTLModel.__new__(CMTLModel)  # skip MoEfication (slow here, irrelevant to counts)
    torch.nn.Module.__init__(m)
    m.backbone, m.adapter_config, m.mode, m.moefy_seed = vit, AdapterConfig(num_experts=16, rank=4), "til", 0
    from cmtl.heads import TaskHeads

    m.heads, m.open_adapters, m.merged_adapters, m._moefied = TaskHeads(768), [], [], True
    m.add_task(10)
    counts = m.parameter_counts()
    # 12 blocks x (fc1 experts 61,440 + fc2 15,360 + qkv 12,288 + proj 6,144 + router 12,288)
    assert counts["adapter"] == 1_290_240 and counts["routers"] == 147_456
    assert 1.0e6 <= counts["adapter"] <= 1.4e6


def test_offline_pretrained_names_checkpoint_option(monkeypatch):
    import cmtl.backbone as bb

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(bb.timm, "create_model", offline)
    with pytest.raises(ValueError, match="set the `checkpoint` option"):
        create_backbone("vit_tiny_patch16_224", pretrained=True)


def test_weight_aligning_matches_new_row_norms_to_old_and_keeps_til_alone():
    from cmtl.heads import TaskHeads

    torch.manual_seed(0)
    heads = TaskHeads(16, mode="cil")
    heads.add_task(3)
    assert heads.align_newest() == 1.0  # one task: nothing to align against
    heads.add_task(2)
    with torch.no_grad():
        heads.heads[1].weight.mul_(5.0)  # the last-trained classes' rows grew: recency bias
        heads.heads[1].bias.fill_(0.5)
    x = torch.randn(4, 16)
    before = heads(x)
    gamma = heads.align_newest()
    old = heads.heads[0].weight.norm(dim=1).mean()
    assert gamma < 1.0
    assert float(heads.heads[1].weight.norm(dim=1).mean()) == pytest.approx(float(old), rel=1e-5)
    after = heads(x)
    assert torch.equal(after[:, :3], before[:, :3])  # old classes untouched
    assert torch.allclose(after[:, 3:], before[:, 3:] * gamma, atol=1e-6)  # new logits scaled
    til = TaskHeads(16, mode="til")
    til.add_task(2)
    til.add_task(2)
    w = til.heads[1].weight.clone()
    assert til.align_newest() == 1.0 and torch.equal(til.heads[1].weight, w)


def test_prototype_head_is_a_nearest_mean_classifier_with_the_given_margin():
    from cmtl.heads import TaskHeads

    torch.manual_seed(0)
    heads = TaskHeads(8, mode="til")
    heads.add_task(3)
    means = torch.randn(3, 8) * 4 + 10  # a shared offset, as pre-logit features have
    assert heads.init_from_means(means, torch.ones(3, dtype=torch.bool), margin=2.0)
    x = means[torch.randint(0, 3, (200,))] + torch.randn(200, 8)
    nearest = torch.cdist(x, means).argmin(dim=1)
    assert torch.equal(heads(x, 0).argmax(dim=1), nearest)
    # logits = -tau |x - mu_c|^2 / 2 up to a per-sample constant, one tau > 0 for every sample
    d2 = torch.cdist(x.double(), means.double()).pow(2)
    logits = heads(x, 0).double()
    tau = (logits[:, 1] - logits[:, 0]) / ((d2[:, 0] - d2[:, 1]) / 2)
    clear = (d2[:, 0] - d2[:, 1]).abs() > 1.0
    assert float(tau[clear].min()) > 0
    assert torch.allclose(tau[clear], tau[clear].median().expand(int(clear.sum())), rtol=1e-3)
    at_means = heads(means, 0)
    margins = [float(at_means[c, c] - at_means[c, o]) for c in range(3) for o in range(3) if o != c]
    assert sum(margins) / len(margins) == pytest.approx(2.0, rel=1e-4)


def test_prototype_head_touches_only_the_newest_rows_with_samples():
    from cmtl.heads import TaskHeads

    torch.manual_seed(0)
    heads = TaskHeads(8, mode="cil")
    heads.add_task(2)
    old = heads.heads[0].weight.clone()
    heads.add_task(3)
    random_row = heads.heads[1].weight[2].clone()
    present = torch.tensor([True, True, False])
    assert heads.init_from_means(torch.randn(3, 8), present)
    assert torch.equal(heads.heads[0].weight, old)
    assert torch.equal(heads.heads[1].weight[2], random_row)
    assert not torch.equal(heads.heads[1].weight[0], random_row)
    # fewer than two classes, or identical means: nothing to separate, nothing changes
    w = heads.heads[1].weight.clone()
    assert not heads.init_from_means(torch.randn(3, 8), torch.tensor([True, False, False]))
    assert not heads.init_from_means(torch.ones(3, 8), torch.ones(3, dtype=torch.bool))
    assert torch.equal(heads.heads[1].weight, w)
    with pytest.raises(ValueError, match=r"do not fit heads range\(1, 2\)"):
        heads.init_from_means(torch.randn(2, 8), torch.ones(2, dtype=torch.bool))


def test_class_incremental_heads_fit_as_one_classifier_and_task_heads_one_at_a_time():
    from cmtl.heads import TaskHeads

    torch.manual_seed(0)
    centres = 4 * torch.eye(4, 8)
    y = torch.arange(4).repeat_interleave(50)
    x = centres[y] + torch.randn(200, 8)
    heads = TaskHeads(8, mode="cil")
    heads.add_task(2)
    heads.add_task(2)
    start = [h.weight.clone() for h in heads.heads]
    assert heads.fit(x, y, tasks=range(0, 2))  # joint training: all four classes at once
    assert all(not torch.equal(h.weight, w) for h, w in zip(heads.heads, start))
    assert float((heads(x).argmax(1) == y).float().mean()) >= 0.95
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    assert heads.init_from_means(means, torch.ones(4, dtype=torch.bool), tasks=range(0, 2))
    assert float((heads(x).argmax(1) == y).float().mean()) >= 0.95
    til = TaskHeads(8, mode="til")
    til.add_task(2)
    til.add_task(2)
    with pytest.raises(ValueError, match=r"tasks range\(0, 2\) must be one head"):
        til.fit(x[y < 2], y[y < 2], tasks=range(0, 2))
    with pytest.raises(ValueError, match=r"not a run of existing heads; valid: within range\(0, 2\)"):
        til.fit(x[y < 2], y[y < 2], tasks=range(2, 3))
    assert til.fit(x[y < 2], y[y < 2], tasks=range(0, 1))
    assert float((til(x[y < 2], 0).argmax(1) == y[y < 2]).float().mean()) >= 0.95


def test_class_incremental_probe_is_fitted_against_the_old_classes_memory(new_rows_gradient):
    """With a replay memory of the old classes, the new rows are fitted in one softmax with the old
    (fixed) rows: the regularised cross-entropy over memory + new images has a vanishing gradient in
    the new rows. Fitted on the new classes alone, that gradient is large (the new logits are on a
    scale of their own)."""
    from cmtl.heads import TaskHeads

    torch.manual_seed(0)
    centres = 4 * torch.eye(4, 8)
    y = torch.arange(4).repeat_interleave(50)
    x = centres[y] + torch.randn(200, 8)
    memory = torch.cat([torch.arange(0, 50, 5), torch.arange(50, 100, 5)])  # 10 stored per old class
    new = y >= 2
    fitted = {}
    for with_memory in (False, True):
        heads = TaskHeads(8, mode="cil")
        heads.add_task(2)
        assert heads.fit(x[~new], y[~new])
        old_rows = [p.clone() for p in heads.heads[0].parameters()]
        heads.add_task(2)
        old = (x[memory], y[memory]) if with_memory else None
        assert heads.fit(x[new], y[new] - 2, old=old)
        assert all(torch.equal(p, q) for p, q in zip(heads.heads[0].parameters(), old_rows))
        both = torch.cat([memory, new.nonzero(as_tuple=True)[0]])
        fitted[with_memory] = new_rows_gradient(heads, x[both], y[both])
    assert fitted[True] < 1e-3 < 1e-2 < fitted[False], fitted
    before = r"old class 3 is not one of the classes before heads range\(1, 2\) \(0..1\)"
    with pytest.raises(ValueError, match=before):
        heads.fit(x[new], y[new] - 2, old=(x[:3], torch.tensor([0, 1, 3])))
    til = TaskHeads(8, mode="til")
    til.add_task(2)
    til.add_task(2)
    with pytest.raises(ValueError, match="only in class-incremental mode"):
        til.fit(x[new], y[new] - 2, old=(x[memory], y[memory]))


def _sheared_two_classes(n: int = 200, seed: int = 0):
    """Two classes that differ only along x2 - x1, under noise along (1, 1): class means are close
    in Euclidean distance, so a nearest-mean head is near chance, while a linear probe separates them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    u = torch.randn(n, generator=g) * 3.0
    x = torch.stack([u, u + 0.5 * (2 * y - 1)], dim=1)
    return x, y


def test_probe_head_is_a_converged_logistic_regression():
    from cmtl.heads import TaskHeads

    x, y = _sheared_two_classes()
    heads = TaskHeads(2, mode="til")
    heads.add_task(2)
    means = torch.stack([x[y == c].mean(0) for c in range(2)])
    assert heads.init_from_means(means, torch.ones(2, dtype=torch.bool))
    prototype_acc = float((heads(x, 0).argmax(1) == y).float().mean())
    assert heads.fit(x, y)
    probe_acc = float((heads(x, 0).argmax(1) == y).float().mean())
    assert prototype_acc < 0.75 and probe_acc >= 0.97
    # the minimum of mean cross-entropy + |W|^2 / (2N): its gradient vanishes there
    w = heads.heads[0].weight.detach().clone().requires_grad_(True)
    b = heads.heads[0].bias.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + w.pow(2).sum() / (2 * len(x))
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert float(gw.abs().max()) < 1e-4 and float(gb.abs().max()) < 1e-4


def test_probe_head_fits_only_the_newest_rows_of_the_classes_present():
    from cmtl.heads import TaskHeads

    torch.manual_seed(0)
    x, y = _sheared_two_classes()
    heads = TaskHeads(2, mode="cil")
    heads.add_task(2)
    old = [p.clone() for p in heads.heads[0].parameters()]
    heads.add_task(3)
    absent = heads.heads[1].weight[2].clone()
    assert heads.fit(x, y)  # labels 0, 1 of the newest head's three rows
    assert all(torch.equal(p, q) for p, q in zip(heads.heads[0].parameters(), old))
    assert torch.equal(heads.heads[1].weight[2], absent)
    assert float((heads(x)[:, 2:4].argmax(1) == y).float().mean()) >= 0.97
    w = heads.heads[1].weight.clone()
    assert not heads.fit(x[y == 0], y[y == 0])  # one class: nothing to separate
    assert torch.equal(heads.heads[1].weight, w)
    with pytest.raises(ValueError, match=r"rows 0..2 of heads range\(1, 2\)"):
        heads.fit(x, y + 2)
    with pytest.raises(ValueError, match=r"do not fit heads range\(1, 2\)"):
        heads.fit(x[:, :1], y)


def test_tune_base_chooses_pre_trained_weights_that_stay_trainable_through_consolidation():
    model = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2))
    vit = model.backbone
    assert model.tuned_base_parameters() == []
    model.tune_base(["embed"])
    embed = {id(p) for p in [*vit.patch_embed.parameters(), vit.pos_embed, vit.cls_token]}
    assert {id(p) for p in model.tuned_base_parameters()} == embed
    model.tune_base(["norms"])  # the embedding is frozen again
    assert not vit.pos_embed.requires_grad and vit.blocks[0].norm2.weight.requires_grad
    model.set_backbone_trainable(False)
    model.add_task(3)
    assert vit.norm.weight.requires_grad
    model.set_fading(0.0)
    model.consolidate()
    assert (
        model.backbone.norm.weight.requires_grad
        and not model.backbone.blocks[0].attn.qkv.weight.requires_grad
    )
    with pytest.raises(ValueError, match="'norm'.*valid: embed, norms"):
        model.tune_base(["norm"])


def _tuned_model(group: str) -> CMTLModel:
    """A tiny model training only the `group` of pre-trained weights, with one task's adapters."""
    model = CMTLModel(tiny_vit(), AdapterConfig(num_experts=4, rank=2))
    model.set_backbone_trainable(False)
    model.tune_base([group])
    model.add_task(3)
    return model


def _step_tuned_base(model: CMTLModel, weight: torch.nn.Parameter) -> torch.Tensor:
    """One SGD step on the tuned pre-trained weights; returns `weight` after it, which moved."""
    before = weight.detach().clone()
    model.forward_features(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    torch.optim.SGD(model.tuned_base_parameters(), lr=0.1).step()
    assert not torch.allclose(weight, before)
    return weight.detach().clone()


def test_tune_base_attn_trains_the_attention_weights_under_their_adapters():
    model = _tuned_model("attn")
    attn = model.backbone.blocks[0].attn
    assert attn.qkv.base_layer.weight.requires_grad and attn.proj.base_layer.bias.requires_grad
    assert not model.backbone.blocks[0].norm1.weight.requires_grad
    assert len(model.tuned_base_parameters()) == 4 * len(model.backbone.blocks)  # weight, bias x2
    trained = _step_tuned_base(model, attn.qkv.base_layer.weight)
    model.set_fading(0.0)
    model.consolidate()  # the new adapters' B factors are still zero: merging adds nothing
    merged = model.backbone.blocks[0].attn.qkv
    assert isinstance(merged, torch.nn.Linear) and merged.weight.requires_grad
    assert torch.allclose(merged.weight, trained)


def test_tune_base_mlp_trains_the_weights_the_experts_are_cut_from_across_re_clustering():
    model = _tuned_model("mlp")
    mlp = model.backbone.blocks[0].mlp
    assert isinstance(mlp, MoEMlp) and mlp.base_layer.fc1.weight.requires_grad
    assert not model.backbone.blocks[0].attn.qkv.base_layer.weight.requires_grad
    assert len(model.tuned_base_parameters()) == 4 * len(model.backbone.blocks)  # fc1, fc2 x2
    trained = _step_tuned_base(model, mlp.base_layer.fc2.weight)
    model.set_fading(0.0)
    model.consolidate()
    plain = model.backbone.blocks[0].mlp
    assert not isinstance(plain, MoEMlp) and plain.fc2.weight.requires_grad
    assert torch.allclose(plain.fc2.weight, trained)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
    model.add_task(2)  # re-clusters the merged MLPs: a permutation of the same trained weights
    again = model.backbone.blocks[0].mlp.base_layer
    assert again.fc1.weight.requires_grad and again.fc2.weight.requires_grad
    assert sorted(p.shape for p in model.tuned_base_parameters()) == sorted(
        p.shape for b in model.backbone.blocks for p in b.mlp.base_layer.parameters()
    )
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ref, atol=1e-5)
