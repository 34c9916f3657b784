"""Issue #21: the teacher's feature statistics for the standardized distance and the class-mean target."""
import math

import torch

from certkd.data import ImageDataset
from certkd.models import create_model
from certkd.training.teacher_stats import DEAD_STD, feature_stats, teacher_feature_stats


def test_feature_stats_by_hand():
    f = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 4.0], [5.0, 2.0, 2.0]])
    s = feature_stats(f, torch.tensor([0, 1, 1]), num_classes=3)
    assert s.mean.tolist() == [3.0, 2.0, 2.0]
    torch.testing.assert_close(s.std, torch.tensor([math.sqrt(8 / 3), 0.0, math.sqrt(8 / 3)]))
    # the constant feature is left out (weight 0), the others get 1/std
    torch.testing.assert_close(s.scale, torch.tensor([1 / math.sqrt(8 / 3), 0.0, 1 / math.sqrt(8 / 3)]))
    # class 0: its one point; class 1: the mean of two; class 2 has no point: the overall mean
    assert s.class_means.tolist() == [[1.0, 2.0, 0.0], [4.0, 2.0, 3.0], [3.0, 2.0, 2.0]]
    assert s.class_counts.tolist() == [1, 2, 0]


def test_nearly_constant_feature_is_left_out():
    f = torch.tensor([[1.0, 0.1], [1.0 + 1e-7, 0.3]])
    s = feature_stats(f, torch.tensor([0, 0]), 1)
    assert s.std[0] <= DEAD_STD * s.std.max() and s.scale[0] == 0 and s.scale[1] > 0


def test_teacher_stats_over_a_dataset_are_those_of_every_training_point():
    torch.manual_seed(0)
    model = create_model("cnn-small", 1, 8, 10).eval()
    images = torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(37) % 10
    data = ImageDataset(images, labels)
    s = teacher_feature_stats(model, data, 10, torch.device("cpu"), batch_size=8)  # 5 batches, the last short
    with torch.no_grad():
        feats = model.features(images.float() / 255)
    torch.testing.assert_close(s.mean, feats.mean(0))
    torch.testing.assert_close(s.std, feats.std(0, unbiased=False))
    for k in range(10):
        torch.testing.assert_close(s.class_means[k], feats[labels == k].mean(0))
    assert s.class_counts.tolist() == [4] * 7 + [3] * 3
