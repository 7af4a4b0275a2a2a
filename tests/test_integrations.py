"""The sparsity regularizer inside a real Lightning fit and a real Hugging Face Trainer run:
the planned channels reach zero and pruning then removes them without changing the outputs."""

import copy

import pytest
import torch
from conftest import TinyResNet, fit
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import compressor as cz


def check_zeroed_and_pruned(model, plan, example, data):
    """The plan's channels are zero (the regularizer ran its whole ramp), and pruning the
    trained model leaves its outputs as they were; the pruned copy."""
    model = model.eval()
    pruned = cz.prune(model, example, plan)
    x = next(iter(data[1]))[0]
    with torch.no_grad():
        assert torch.allclose(model(x), pruned(x), atol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    return pruned


def distilled_closer(teacher, before, after, data):
    """Distillation moved the student's outputs toward the teacher's."""
    x = next(iter(data[1]))[0]
    with torch.no_grad():
        gap = [F.mse_loss(m.eval()(x), teacher(x)).item() for m in (before, after)]
    assert gap[1] < gap[0]


def test_lightning_fit_with_the_sparsity_callback(data, example, tmp_path):
    lightning = pytest.importorskip("lightning")
    from compressor.integrations.lightning import SparsityCallback

    class Lit(lightning.LightningModule):
        def __init__(self, net, loss) -> None:
            super().__init__()
            self.net, self.loss = net, loss

        def training_step(self, batch, _index):
            x, y = batch
            return self.loss(self.net(x), x, y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def trainer(*callbacks):
        return lightning.Trainer(
            max_epochs=2,
            accumulate_grad_batches=2,
            precision="bf16-mixed",
            gradient_clip_val=1.0,
            callbacks=list(callbacks),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            accelerator="cpu",
            devices=1,
        )

    torch.manual_seed(0)
    teacher = fit(TinyResNet(), data[0])
    lit = Lit(copy.deepcopy(teacher).train(), lambda out, x, y: F.cross_entropy(out, y))
    plan = cz.plan_pruning(lit.net, example, ratio=0.5, round_to=None)
    callback = SparsityCallback(plan)
    fitted = trainer(callback)
    fitted.fit(lit, data[0])
    reg = callback.regularizer
    assert reg.steps_taken == reg.total_steps == fitted.global_step == 8
    assert reg.report()["scheduled_zero_fraction"] == 1.0
    pruned = check_zeroed_and_pruned(lit.net, plan, example, data)
    # the rest of the flow: distil with the loss, quantize, compare
    distil = Lit(copy.deepcopy(pruned).train(), cz.DistillationLoss(teacher, alpha=1.0))
    trainer().fit(distil, data[0])
    distilled_closer(teacher, pruned, distil.net, data)
    path = cz.quantize(distil.net, data[0], tmp_path / "model.int8.onnx")
    report = cz.compare({"baseline": teacher, "int8": path}, data[1])
    assert report.rows[-1].precision == "int8" and report.parity["top1_agreement"] > 0.5


class Images(Dataset):
    """The test images as the dicts a Hugging Face Trainer feeds a model."""

    def __init__(self, loader: DataLoader) -> None:
        self.items = [(x, y) for xs, ys in loader for x, y in zip(xs, ys)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        x, y = self.items[index]
        return {"pixel_values": x, "labels": y}


class WithLoss(nn.Module):
    """A torch model as the Trainer wants it: keyword inputs, a dict with the loss."""

    def __init__(self, net, loss) -> None:
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return {"logits": logits, "loss": self.loss(logits, pixel_values, labels)}


def test_hugging_face_trainer_with_the_sparsity_callback(data, example, tmp_path):
    transformers = pytest.importorskip("transformers")
    from compressor.integrations.transformers import SparsityCallback

    torch.manual_seed(0)
    teacher = fit(TinyResNet(), data[0])
    model = WithLoss(copy.deepcopy(teacher), lambda out, x, y: F.cross_entropy(out, y))
    plan = cz.plan_pruning(model.net, example, ratio=0.5, round_to=None)
    callback = SparsityCallback(plan)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    images = Images(data[0])
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=images, callbacks=[callback]
    )
    trainer.train()
    reg = callback.regularizer
    assert reg.steps_taken == reg.total_steps == trainer.state.global_step == 8
    assert reg.report()["scheduled_zero_fraction"] == 1.0
    pruned = check_zeroed_and_pruned(copy.deepcopy(model.net), plan, example, data)
    student = WithLoss(copy.deepcopy(pruned), cz.DistillationLoss(teacher, alpha=1.0))
    transformers.Trainer(model=student, args=args, train_dataset=images).train()
    distilled_closer(teacher, pruned, student.net, data)
