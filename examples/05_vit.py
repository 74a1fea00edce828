"""Convert a vision transformer and recover it.

A small ViTForImageClassification (16x16 images, patch 4: 16 patch tokens + CLS, width 48, 2 layers) is
trained briefly on scikit-learn's handwritten digits (1,797 8x8 images, upsampled; random images when
scikit-learn is not installed, and then the accuracies mean nothing). It is converted, its attention
becoming bidirectional M2 mixers, then recovered with ``m2.distill`` on the training images: layer-wise
transfer, then knowledge distillation with the labels. Test accuracy is printed for all three.
``benchmarks/vit_recovery.py`` is the full-size run.

    python examples/05_vit.py [--smoke]

``--smoke`` trains 20 teacher steps and recovers for 4 + 4 steps.
"""

import argparse

import torch
import torch.nn.functional as F
import transformers

import m2convert as m2

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smoke", action="store_true", help="a tiny budget (a test runs this)")
args = parser.parse_args()
teacher_steps, transfer_steps, kd_steps = (20, 4, 4) if args.smoke else (400, 100, 200)
torch.manual_seed(0)


# 1. Images (B, 1, 16, 16) and labels (B,): digits if scikit-learn is there, else random ones.
def images() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("scikit-learn is not installed: random images, so the accuracies below mean nothing")
        return torch.randn(1797, 1, 16, 16), torch.randint(0, 10, (1797,))
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0             # (1797, 1, 8, 8)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)                 # (1797, 1, 16, 16)
    return (x - 0.5) / 0.5, torch.tensor(digits.target)


x, y = images()
order = torch.randperm(len(x))
train, test = order[:1350], order[1350:]                               # the test quarter is never trained on


def batches(n: int, size: int = 64) -> list[dict]:
    picks = torch.randint(0, len(train), (n, size))
    return [{"pixel_values": x[train[p]], "labels": y[train[p]]} for p in picks]


@torch.no_grad()
def accuracy(model) -> float:
    return (model.eval()(pixel_values=x[test]).logits.argmax(-1) == y[test]).float().mean().item()


# 2. A teacher trained from scratch for a few hundred steps.
config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=48, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=96, num_labels=10)
teacher = transformers.ViTForImageClassification(config)
optimizer = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
for batch in batches(teacher_steps):
    loss = teacher.train()(**batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
teacher.eval()

# 3. Convert: 2 attention sites -> M2 mixers, 2 MLPs -> Monarch matrices.
student = m2.convert(teacher, m2.ConvertConfig(filter_order=16))
converted = accuracy(student)

# 4. Recover on the training images: transfer, then KD + the labels' loss.
stages = [m2.StageConfig("transfer", steps=transfer_steps, lr=2e-3), m2.StageConfig("task", steps=kd_steps, lr=1e-3,
                                                                                   kd_weight=1.0)]
m2.distill(student, teacher, batches(transfer_steps + kd_steps), m2.DistillConfig(stages=stages, progress=False))
print(f"test accuracy on {len(test)} images: teacher {accuracy(teacher):.3f}, converted {converted:.3f}, "
      f"recovered {accuracy(student):.3f}")
