"""Snapshots: exact round trips (TIL, CIL, factory-less backbones), plain-timm loading without cmtl,
corrupted files, atomic replacement, and `predict` preprocessing. Tiny models only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import timm
import torch
from cmtl.scenarios.transforms import make_transforms
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import cmtl
from cmtl import snapshot as snap_mod
from cmtl.model import AdapterConfig, CMTLModel
from cmtl.snapshot import SNAPSHOT_FORMAT, Snapshot, SnapshotError, load_snapshot, save_snapshot

WIDTHS = (3, 5)  # classes per task; different widths exercise the TIL padding
NAMES = [["cat", "dog", "emu"], ["v", "w", "x", "y", "z"]]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def timm_vit() -> VisionTransformer:
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
    )


def bare_vit(**kw) -> VisionTransformer:
    return VisionTransformer(
        **{**dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0), **kw}
    )


def size_of(model) -> int:
    return model.backbone.patch_embed.img_size[0]


def feats(vit, x):
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


@torch.no_grad()
def consolidated(vit: VisionTransformer, mode: str) -> tuple[CMTLModel, dict]:
    """Two tasks with random (non-identity) adapters, faded and consolidated; plus check data."""
    x = torch.randn(6, 3, vit.patch_embed.img_size[0], vit.patch_embed.img_size[1])
    base_out = feats(vit.eval(), x).clone()
    model = CMTLModel(vit, AdapterConfig(num_experts=4, rank=2), mode=mode).eval()
    for n in WIDTHS:
        model.add_task(n)
        for p in model.adapter_parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.set_fading(0.0)
    adapted_out = model.forward_features(x).clone()
    model.consolidate()
    return model, {"x": x, "base": base_out, "adapted": adapted_out}


def meta_for(model) -> dict:
    return {
        "task_classes": NAMES,
        "mean": list(MEAN),
        "std": list(STD),
        "image_size": size_of(model),
        "config": {"lr": 0.1},
        "metrics": {"acc": 0.5},
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Snapshots of a timm-factory TIL model, a CIL model, and a factory-less TIL model."""
    root = tmp_path_factory.mktemp("snaps")
    out = {}
    for kind, make, mode in (
        ("til", timm_vit, "til"),
        ("cil", timm_vit, "cil"),
        ("bare", partial(bare_vit, global_pool="avg", reg_tokens=1), "til"),
    ):
        torch.manual_seed(len(out))
        model, data = consolidated(make(), mode)
        path = save_snapshot(model, root / kind, meta_for(model))
        out[kind] = (model, path, data)
    return out


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["til", "cil", "bare"])
def test_roundtrip_matches_model(saved, kind):
    model, path, data = saved[kind]
    x = data["x"]
    assert not torch.allclose(data["adapted"], data["base"], atol=1e-3), "adapters did not change the model"
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), data["adapted"], atol=1e-5, rtol=0)
        snap = load_snapshot(path)
        assert isinstance(snap, Snapshot) and not snap.training
        assert type(snap.backbone) is VisionTransformer and snap.backbone.num_classes == 0
        if model.mode == "cil":
            for task in (None, 0, 1):  # CIL ignores the task
                torch.testing.assert_close(snap(x, task), model(x), atol=1e-5, rtol=0)
            assert snap(x).shape == (len(x), sum(WIDTHS))
        else:
            for task in range(len(WIDTHS)):
                torch.testing.assert_close(snap(x, task), model(x, task), atol=1e-5, rtol=0)
                torch.testing.assert_close(snap(x, torch.tensor(task)), model(x, task), atol=1e-5, rtol=0)
            mixed = torch.tensor([0, 1, 1, 0, 1, 0])
            torch.testing.assert_close(snap(x, mixed), model(x, mixed), atol=1e-5, rtol=0)
            assert (snap(x, mixed)[mixed == 0, WIDTHS[0] :] == -1e4).all()
    assert snap.mode == model.mode and snap.task_classes == NAMES
    assert snap.mean == MEAN and snap.std == STD and snap.image_size == size_of(model)
    meta = snap.meta
    assert meta["format"] == SNAPSHOT_FORMAT and meta["classes_per_task"] == list(WIDTHS)
    assert meta["config"] == {"lr": 0.1} and meta["metrics"] == {"acc": 0.5}
    assert set(meta["versions"]) == {"cmtl", "torch", "timm"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_classes"] == 0
    assert cfg["pretrained_cfg"]["mean"] == list(MEAN) and cfg["pretrained_cfg"]["std"] == list(STD)
    assert sorted(os.listdir(path)) == ["config.json", "heads.safetensors", "meta.json", "model.safetensors"]


def test_plain_timm_loads_without_cmtl(saved, tmp_path):
    """A fresh interpreter that never imports cmtl rebuilds every backbone from `local-dir:`."""
    inputs, expected, dirs = {}, {}, []
    for i, (model, path, data) in enumerate(saved.values()):
        inputs[f"x{i}"] = data["x"]
        with torch.no_grad():
            expected[f"x{i}"] = feats(model.backbone, data["x"])
        dirs.append(str(path))
    save_file(inputs, str(tmp_path / "in.safetensors"))
    script = textwrap.dedent(
        """
        import sys, timm, torch
        from safetensors.torch import load_file, save_file
        inputs, out = load_file(sys.argv[1]), {}
        for i, d in enumerate(sys.argv[3:]):
            m = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
            with torch.no_grad():
                out[f"x{i}"] = m(inputs[f"x{i}"]).contiguous()
        assert "cmtl" not in sys.modules, "cmtl was imported"
        save_file(out, sys.argv[2])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    files = [str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")]
    proc = subprocess.run(
        [sys.executable, "-c", script, *files, *dirs],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(tmp_path / "out.safetensors"))
    for key, want in expected.items():
        torch.testing.assert_close(got[key], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(global_pool="avg", reg_tokens=2, qkv_bias=False),
        dict(class_token=False, global_pool="avg", no_embed_class=True, init_values=1e-3, fc_norm=False),
        dict(pre_norm=True, final_norm=False, mlp_ratio=2.0, qk_norm=True),
        dict(in_chans=1, patch_size=4, img_size=(16, 24)),
    ],
)
def test_factoryless_backbones_roundtrip(tmp_path, kw):
    vit = bare_vit(**kw).eval()
    model = CMTLModel(vit, adapter=None, mode="til")
    model.add_task(2)
    c, (h, w) = vit.patch_embed.proj.in_channels, vit.patch_embed.img_size
    x = torch.randn(2, c, h, w)
    mean_std = {"mean": [0.5] * c, "std": [0.5] * c}
    snap = load_snapshot(save_snapshot(model, tmp_path / "s", mean_std))
    with torch.no_grad():
        torch.testing.assert_close(snap(x, 0), model(x, 0), atol=1e-5, rtol=0)
    assert not hasattr(vit, "pretrained_cfg"), "saving left a borrowed pretrained_cfg behind"


def test_unrepresentable_backbone_is_refused(tmp_path):
    vit = bare_vit(norm_layer=partial(nn.LayerNorm, eps=1e-5))  # timm's default eps is 1e-6
    model = CMTLModel(vit, adapter=None)
    model.add_task(2)
    with pytest.raises(ValueError, match="timm.create_model"):
        save_snapshot(model, tmp_path / "s", {})
    assert list(tmp_path.iterdir()) == []


# -- refusals and corrupted files -----------------------------------------------------------------


def test_open_adapters_are_refused(tmp_path):
    model = CMTLModel(timm_vit(), AdapterConfig(num_experts=4, rank=2), mode="til")
    model.add_task(3)
    with pytest.raises(ValueError, match="open adapters.*task0"):
        save_snapshot(model, tmp_path / "s", {})
    assert list(tmp_path.iterdir()) == []


def test_bad_meta_is_refused(saved, tmp_path):
    model = saved["til"][0]
    with pytest.raises(ValueError, match="task_classes"):
        save_snapshot(model, tmp_path / "s", {"task_classes": [["a"], ["b"]]})
    with pytest.raises(TypeError):
        save_snapshot(model, tmp_path / "s", {"metrics": {"f": object()}})
    assert list(tmp_path.iterdir()) == []


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _set_meta(**kw):
    def edit(p):
        p.write_text(json.dumps({**json.loads(p.read_text()), **kw}))

    return edit


def _swap_head_tensor(p):
    t = load_file(str(p))
    t["task1.weight"] = t["task1.weight"][:2]
    save_file(t, str(p))


@pytest.mark.parametrize(
    "name, corrupt, problem",
    [
        ("model.safetensors", _truncate, "safetensors"),
        ("model.safetensors", lambda p: p.unlink(), "missing"),
        ("heads.safetensors", _truncate, "safetensors"),
        ("heads.safetensors", _swap_head_tensor, "task1"),
        ("meta.json", lambda p: p.unlink(), "missing"),
        ("meta.json", lambda p: p.write_bytes(b"\x00{garbage"), "JSON"),
        ("meta.json", _set_meta(format=99), "format"),
        ("meta.json", _set_meta(classes_per_task=[3]), "task"),
        ("config.json", lambda p: p.write_text("[1, 2"), "JSON"),
        ("config.json", _set_meta(model_args={"embed_dim": 64}), "load"),
    ],
)
def test_corrupted_snapshot_names_the_file(saved, tmp_path, name, corrupt, problem):
    path = shutil.copytree(saved["til"][1], tmp_path / "s")
    corrupt(path / name)
    with pytest.raises(SnapshotError, match=problem) as err:
        load_snapshot(path)
    msg = str(err.value)
    assert name in msg and "\n" not in msg, msg


def test_missing_directory(tmp_path):
    with pytest.raises(SnapshotError, match="not a snapshot directory"):
        load_snapshot(tmp_path / "nope")


# -- atomic replacement ---------------------------------------------------------------------------


def _heads(path):
    return load_file(str(path / "heads.safetensors"))


@pytest.mark.parametrize("fail_on_call", [1, 2])  # backbone weights, then heads
def test_failed_save_leaves_previous_snapshot(saved, tmp_path, monkeypatch, fail_on_call):
    old_model, new_model = saved["til"][0], saved["cil"][0]
    path = save_snapshot(old_model, tmp_path / "snap", meta_for(old_model))
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        assert os.path.basename(os.path.dirname(filename)).startswith(".snap.tmp-")
        if len(calls) == fail_on_call:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(snap_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_snapshot(new_model, path, meta_for(new_model))
    assert sorted(os.listdir(tmp_path)) == ["snap"], "temp directory left behind"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert load_snapshot(path).mode == "til"

    monkeypatch.undo()
    save_snapshot(new_model, path, meta_for(new_model))
    assert sorted(os.listdir(tmp_path)) == ["snap"]
    assert load_snapshot(path).mode == "cil"
    assert _heads(path)["task0.weight"].equal(new_model.heads.heads[0].weight)


def test_foreign_directory_is_not_replaced(saved, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a snapshot directory"):
        save_snapshot(saved["til"][0], tmp_path / "run", {})
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


# -- predict --------------------------------------------------------------------------------------


def test_predict_preprocesses_like_the_stream(saved):
    snap = load_snapshot(saved["til"][1])
    size = snap.image_size
    _, eval_tf = make_transforms(size, MEAN, STD, augment=False)
    g = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (4, 24, 20, 3), dtype=torch.uint8, generator=g)
    nchw = nhwc.permute(0, 3, 1, 2)
    want = torch.stack([eval_tf(img) for img in nchw])
    assert want.shape == (4, 3, size, size)
    x = snap.preprocess(nhwc)
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(snap.preprocess(nchw), want, atol=1e-6, rtol=0)
    pil = [Image.fromarray(a) for a in nhwc.numpy()]
    torch.testing.assert_close(snap.preprocess(pil), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(snap.preprocess(list(nhwc.numpy())), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(snap.preprocess(nhwc.numpy()), want, atol=1e-6, rtol=0)
    assert snap.preprocess(want) is want  # already normalised floats pass through

    gray = nhwc[..., 0]  # N x H x W
    want_gray = torch.stack([eval_tf(img[None]) for img in gray])
    torch.testing.assert_close(snap.preprocess(gray), want_gray, atol=1e-6, rtol=0)
    gray_pil = [Image.fromarray(a) for a in gray.numpy()]
    torch.testing.assert_close(snap.preprocess(gray_pil), want_gray, atol=1e-6, rtol=0)

    with torch.no_grad():
        for task in (0, 1):
            pred = snap.predict(nhwc, task)
            assert pred.dtype == torch.long and pred.shape == (4,)
            assert pred.equal(snap(want, task).argmax(-1))
            assert int(pred.max()) < WIDTHS[task]
    with pytest.raises(ValueError, match="task"):
        snap.predict(nhwc)
    with pytest.raises(ValueError, match="task"):
        snap(want)
    with pytest.raises(ValueError, match="valid: 0..1"):
        snap(want, 2)
    assert snap.class_name(2, task=0) == "emu" and snap.class_name(torch.tensor(0), task=1) == "v"
    with pytest.raises(ValueError, match="task"):
        snap.class_name(0)


def test_cil_predict_uses_global_labels(saved):
    model, path, _ = saved["cil"]
    snap = load_snapshot(path)
    images = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8)
    pred = snap.predict(images)
    with torch.no_grad():
        assert pred.equal(model(snap.preprocess(images)).argmax(-1))
    assert snap.class_name(3) == "v" and snap.class_name(0) == "cat"
    with pytest.raises(ValueError, match="out of range"):
        snap.class_name(sum(WIDTHS))


def test_lazy_package_export():
    assert cmtl.load_snapshot is load_snapshot
