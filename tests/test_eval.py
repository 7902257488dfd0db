"""Tests of cps_fast.eval: confusion matrix, mIoU, sliding-window inference, evaluate, DDP reduce."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cps_fast.eval import ConfusionMatrix, evaluate, predict, sliding_window_inference


# ---------------------------------------------------------------- confusion matrix


def test_miou_hand_computed():
    # 4 classes; class 3 absent from prediction and target -> NaN; 255 ignored.
    target = torch.tensor([0, 0, 0, 1, 1, 2, 255, 255], dtype=torch.uint8)
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    expected = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)
    r = cm.compute()
    # IoU: c0 2/(3+2-2)=2/3, c1 1/(2+2-1)=1/3, c2 1/(1+2-1)=1/2, c3 NaN
    assert r["iou"][0] == pytest.approx(2 / 3)
    assert r["iou"][1] == pytest.approx(1 / 3)
    assert r["iou"][2] == pytest.approx(1 / 2)
    assert math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 6)
    assert r["mean_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert r["num_pixels"] == 6
    table = r.table(["bg", "cat", "dog", "cow"])
    assert "cow" in table and "-" in table and "66.67" in table


def test_class_only_in_prediction_has_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[2, 0]]), torch.tensor([[0, 0]]))
    r = cm.compute()
    assert r["iou"][2] == 0.0  # predicted but never true: 0, not NaN
    assert math.isnan(r["iou"][1])


def test_update_batches_equals_concatenation():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 19, (2, 13, 17), generator=g) for _ in range(3)]
    targets = [torch.randint(0, 19, (2, 13, 17), generator=g) for _ in range(3)]
    for t in targets:
        t[t == 5] = 255
    a = ConfusionMatrix(19)
    for p, t in zip(preds, targets):
        a.update(p, t)
    b = ConfusionMatrix(19)
    b.update(torch.cat(preds), torch.cat(targets))
    assert torch.equal(a.mat, b.mat)
    assert a.mat.sum() == sum(int((t != 255).sum()) for t in targets)
    a.reset()
    assert a.mat.sum() == 0


def test_bad_target_raises_with_values():
    cm = ConfusionMatrix(21)
    with pytest.raises(ValueError, match=r"target has values \[37\] outside 0..20 and not ignore \(255\)"):
        cm.update(torch.tensor([1, 37]), torch.tensor([1, 37]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    # without validation the bad pixel is dropped
    cm.update(torch.tensor([1, 37]), torch.tensor([1, 37]), validate=False)
    assert int(cm.mat.sum()) == 1


def test_device_histogram_path_matches_bincount():
    # The CUDA path (scatter_add into a fixed buffer) must equal bincount; check it on CPU.
    from cps_fast.eval.metrics import _histogram

    idx = torch.randint(0, 50, (1000,))
    out = torch.zeros(51, dtype=torch.int64).scatter_add_(0, idx, torch.ones_like(idx))
    assert torch.equal(out, _histogram(idx, 51))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_confusion_matrix_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, 21, (4, 65, 33), generator=g)
    t = torch.randint(0, 21, (4, 65, 33), generator=g)
    t[:, :5] = 255
    a, b = ConfusionMatrix(21), ConfusionMatrix(21, device="cuda")
    a.update(p, t)
    b.update(p.cuda(), t.cuda().to(torch.uint8))
    assert torch.equal(a.mat, b.mat.cpu())


# ---------------------------------------------------------------- sliding window


def _conv_model(c_in=3, c_out=5, k=1, seed=0):
    torch.manual_seed(seed)
    m = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=True).eval()
    return m


def test_one_window_equals_whole_image():
    model = _conv_model()
    x = torch.randn(2, 3, 11, 14)
    out = sliding_window_inference(model, x, 5, crop_size=16)
    assert out.shape == (2, 5, 11, 14)
    torch.testing.assert_close(out, model(x))


def test_one_window_with_padding_and_context_model():
    # A 3x3 conv sees the zero padding at the border exactly as F.conv2d's own
    # zero padding would, once the image is padded (centred) to the crop.
    model = _conv_model(k=3)
    x = torch.randn(1, 3, 9, 12)
    out = sliding_window_inference(model, x, 5, crop_size=(9, 12))
    torch.testing.assert_close(out, model(x))


def test_several_windows_translation_equivariant_model():
    model = _conv_model()
    x = torch.randn(2, 3, 37, 50)
    out = sliding_window_inference(model, x, 5, crop_size=16, window_batch=3)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    # probabilities average to the softmax of the (window-independent) logits
    probs = sliding_window_inference(model, x, 5, crop_size=(16, 20), stride=(7, 9), output="probs")
    torch.testing.assert_close(probs, model(x).softmax(1), rtol=1e-5, atol=1e-5)


def test_window_grid_matches_reference():
    from cps_fast.eval.inference import _window_starts

    # reference: stride = ceil(512 * 2/3) = 342; 1024 rows -> ceil(512/342)+1 = 3 windows, last flush
    assert _window_starts(1024, 512, 342) == [0, 342, 512]
    assert _window_starts(512, 512, 342) == [0]
    assert _window_starts(2048, 800, 534) == [0, 534, 1068, 1248]


def test_windows_are_counted_once_each():
    # model returning a constant: the average must be that constant everywhere.
    const = lambda x: torch.ones(x.shape[0], 4, *x.shape[2:])  # noqa: E731
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return const(x)

    out = sliding_window_inference(fn, torch.zeros(1, 3, 30, 45), 4, crop_size=16, stride=10)
    assert torch.all(out == 1)
    # rows: ceil((30-16)/10)+1 = 3, cols: ceil((45-16)/10)+1 = 4 -> 12 windows in batches of 8
    assert calls == [8, 4]


def test_flip_averaging_symmetric_case():
    # The model is not flip-equivariant; on a mirror-symmetric image flip averaging
    # equals the average of the model and its mirrored response.
    torch.manual_seed(0)
    w = torch.randn(5, 3, 1, 3)
    model = lambda x: F.conv2d(x, w, padding=(0, 1))  # noqa: E731
    half = torch.randn(1, 3, 8, 5)
    x = torch.cat([half, half.flip(-1)], -1)  # symmetric about the vertical axis
    out = sliding_window_inference(model, x, 5, crop_size=16, flip=True)
    expected = 0.5 * (model(x) + model(x.flip(-1)).flip(-1))
    torch.testing.assert_close(out, expected)
    # the flip-averaged scores of a symmetric image are themselves symmetric
    torch.testing.assert_close(out, out.flip(-1))


def test_multiscale_averages_resized_scores():
    model = _conv_model()
    x = torch.randn(1, 3, 20, 24)
    out = sliding_window_inference(model, x, 5, crop_size=32, scales=(0.5, 1.0))
    small = model(F.interpolate(x, size=(10, 12), mode="bilinear", align_corners=False))
    expected = 0.5 * (model(x) + F.interpolate(small, size=(20, 24), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bad_model_output_is_reported():
    with pytest.raises(ValueError, match="expected \\(1, 5, 16, 16\\)"):
        sliding_window_inference(lambda x: x[:, :2], torch.zeros(1, 3, 8, 8), 5, crop_size=16)


# ---------------------------------------------------------------- evaluate


def _toy_dataset(n=5, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = (12, 15) if i % 2 else (20, 9)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lab = (img[..., 0] > 127).astype(np.uint8)  # class 1 where red is bright
        lab[0, 0] = 255
        items.append({"image": img, "label": lab, "name": f"img{i}"})
    return items


def _red_threshold_model(x):
    # normalised red > 0.5-ish  -> class 1; logits (B, 2, H, W)
    r = x[:, :1]
    return torch.cat([-r, r], 1) * 10


def test_evaluate_matches_direct_confusion_matrix():
    data = _toy_dataset()
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    cm = ConfusionMatrix(2)
    for it in data:
        x = torch.from_numpy(it["image"]).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]
        cm.update(_red_threshold_model(x)[0].argmax(0), torch.from_numpy(it["label"]))
    expected = cm.compute()
    for crop, bs in ((32, 4), (32, 1), (8, 4)):  # batched one-window path, per image, sliding
        r = evaluate(_red_threshold_model, data, 2, crop_size=crop, mean=mean, std=std,
                     device="cpu", batch_size=bs)
        assert r["miou"] == pytest.approx(expected["miou"])
        assert r["num_images"] == len(data)
    # iterable input works too
    r = evaluate(_red_threshold_model, iter(data), 2, crop_size=32, mean=mean, std=std, device="cpu")
    assert r["pixel_acc"] == pytest.approx(expected["pixel_acc"])
    # the class map of predict() is what evaluate scored
    pm = predict(_red_threshold_model, data[0]["image"], 2, crop_size=32, mean=mean, std=std, device="cpu")
    assert pm.dtype == np.uint8 and pm.shape == data[0]["label"].shape


def test_evaluate_bad_label_names_item():
    data = _toy_dataset(2)
    data[1]["label"][3, 3] = 37
    with pytest.raises(ValueError, match=r"item 'img1'.*\[37\]"):
        evaluate(_red_threshold_model, data, 2, crop_size=32, device="cpu")
    data[0]["label"] = None
    with pytest.raises(ValueError, match="img0.*no label"):
        evaluate(_red_threshold_model, data, 2, crop_size=32, device="cpu")


def test_evaluate_sharding_covers_all_items():
    data = _toy_dataset(5)
    full = evaluate(_red_threshold_model, data, 2, crop_size=32, device="cpu")
    parts = [evaluate(_red_threshold_model, data, 2, crop_size=32, device="cpu", rank=r, world_size=2)
             for r in range(2)]
    assert parts[0]["num_images"] + parts[1]["num_images"] == 5
    assert parts[0]["num_pixels"] + parts[1]["num_pixels"] == full["num_pixels"]


# ---------------------------------------------------------------- distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([rank, 2]), torch.tensor([rank, 2]))
        cm.all_reduce()
        torch.save(cm.mat, os.path.join(out_dir, f"mat{rank}.pt"))
        r = evaluate(_red_threshold_model, _toy_dataset(5), 2, crop_size=32, device="cpu")
        torch.save(torch.tensor([r["num_pixels"]]), os.path.join(out_dir, f"eval{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_process_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 2]])
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"mat{r}.pt"), expected)
    full = evaluate(_red_threshold_model, _toy_dataset(5), 2, crop_size=32, device="cpu")
    for r in range(2):
        assert int(torch.load(tmp_path / f"eval{r}.pt")) == full["num_pixels"]


def test_all_reduce_without_process_group_is_noop():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1]), torch.tensor([1]))
    assert torch.equal(cm.all_reduce().mat, torch.tensor([[0, 0], [0, 1]]))
