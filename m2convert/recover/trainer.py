"""The Hugging Face ``Trainer`` route: distill a converted student inside an existing Trainer setup.

``DistillTrainer`` is a ``transformers.Trainer`` whose loss is the ``kd`` / ``task`` objective of
:func:`m2convert.distill` (labels' loss + temperature KL to the teacher + optional hidden-state MSE);
everything else (optimizer, schedule, logging, checkpoints, DDP via accelerate) is the Trainer's.
For layer-wise transfer, run ``distill(..., DistillConfig(stages=["transfer"]))`` first.
"""

from __future__ import annotations

from transformers import Trainer

from ..errors import ConfigError
from .config import StageConfig
from .stages import EndToEndObjective, teacher_forward


class DistillTrainer(Trainer):
    """``Trainer`` with a distillation loss against a frozen ``teacher``.

    Args:
        teacher: the original (or fine-tuned) model; run forward in eval mode on the student's device.
        temperature, kd_weight, hidden_weight, task_weight: as in :class:`StageConfig`. With
            ``task_weight`` 0 the batches need no labels (pure KD).
        Everything else goes to ``transformers.Trainer``.

    Shapes: batches as the model takes them (input_ids (B, N), attention_mask (B, N), labels).

    Example:
        >>> from m2convert.recover import DistillTrainer        # loaded on first use (imports Trainer)
        >>> teacher = transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=100,
        ...     hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
        >>> student = m2.convert(teacher, m2.ConvertConfig(filter_order=16))
        >>> train = [{"input_ids": torch.randint(0, 100, (12,)), "labels": torch.tensor(i % 2)} for i in range(8)]
        >>> args = transformers.TrainingArguments("out", max_steps=2, per_device_train_batch_size=4,
        ...                                       report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
        >>> trainer = DistillTrainer(model=student, teacher=teacher, args=args, train_dataset=train,
        ...                          temperature=2.0, task_weight=0.0)
        >>> trainer.train().global_step                         # Trainer prints its summary first
        {'train_runtime': ...}
        2
    """

    def __init__(self, *args, teacher=None, temperature: float = 2.0, kd_weight: float = 1.0,
                 hidden_weight: float = 0.0, task_weight: float = 1.0, **kwargs):
        if teacher is None:
            raise ConfigError("DistillTrainer needs teacher= (the model the student was converted from)")
        super().__init__(*args, **kwargs)
        name = "task" if task_weight > 0 else "kd"
        self.stage = StageConfig(name, steps=1, temperature=temperature, kd_weight=kd_weight,
                                 hidden_weight=hidden_weight, task_weight=task_weight)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        device = next(model.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        t_out = teacher_forward(self.teacher, inputs, hidden=self.stage.hidden_weight > 0)
        loss = EndToEndObjective(model, self.stage)(inputs, t_out)
        return (loss, {"loss": loss}) if return_outputs else loss
