"""What differs between image classification and translation: model kwargs, the loss, evaluation.

The trainer calls ``task.loss(model, batch)`` and ``task.evaluate(...)`` and never looks at batches.
Evaluation sums counts on every rank and reduces them once (exact on any number of processes).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .models import create_model, model_family

__all__ = ["build_model", "model_kwargs", "Task", "ClassificationTask", "TranslationTask", "make_task"]


def model_kwargs(cfg, info: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``cfg.model.name``'s entry function for this data (None values dropped);
    stored with an export so that the architecture can be built again without the config."""
    m = cfg.model
    family = model_family(m.name)
    if family == "transformer":
        kw = dict(vocab_size=info["vocab_size"], pad_id=info["pad_id"], bos_id=info["bos_id"], eos_id=info["eos_id"])
    else:
        kw = dict(num_classes=m.num_classes or info.get("num_classes"), in_chans=m.in_chans or info.get("in_chans"),
                  img_size=m.img_size or info.get("img_size"), width_mult=m.width_mult, stem=m.stem, norm=m.norm,
                  drop_path_rate=m.drop_path_rate)
    if getattr(m, "distillation", "none") != "none":
        kw["distilled"] = True
    kw.update(m.extra)
    return {k: v for k, v in kw.items() if v is not None}


def build_model(cfg, info: dict[str, Any]) -> nn.Module:
    """Create ``cfg.model.name`` with the shape facts of the data (classes, channels, vocabulary)."""
    kw = model_kwargs(cfg, info)
    try:
        return create_model(cfg.model.name, **kw)
    except TypeError as err:
        raise ConfigError(f"model ({cfg.model.name})", kw, f"arguments that {cfg.model.name} accepts ({err})") from None


class Task:
    name = "task"

    def __init__(self, cfg, info: dict[str, Any]):
        self.cfg, self.info = cfg, info

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def model_input(self, batch) -> tuple:
        """The positional arguments of the model's forward for ``batch``."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        return model(*self.model_input(batch))

    def evaluate(self, model: nn.Module, loader, accelerator, epoch: int) -> dict[str, float]:
        raise NotImplementedError


class ClassificationTask(Task):
    name = "classification"

    def model_input(self, batch) -> tuple:
        return (batch[0],)

    teacher: nn.Module | None = None  # hard distillation (set by the trainer: frozen, eval mode, on the device)

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.is_floating_point():  # soft targets of Mixup/CutMix (label smoothing already folded in)
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy()(logits.float(), y.float())
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.optim.label_smoothing)

    def forward(self, model: nn.Module, batch) -> torch.Tensor:
        out = model(*self.model_input(batch))
        return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out  # a distilled DeiT in training

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        out = model(x)
        if not isinstance(out, tuple):
            return self._ce(out, y)
        # DeiT with distillation in training: (class head, distillation head). Hard distillation
        # (Touvron et al. 2021, eq. 3): 1/2 CE(class head, y) + 1/2 CE(distillation head, teacher argmax).
        cls, dist = out
        if self.teacher is None:
            raise RuntimeError("the model returns a distillation head but no teacher is set")
        with torch.no_grad():
            p = next(self.teacher.parameters())
            target = self.teacher(x.to(p.dtype)).argmax(-1)
        return 0.5 * self._ce(cls, y) + 0.5 * F.cross_entropy(dist, target)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, accelerator, epoch: int) -> dict[str, float]:
        device = accelerator.device
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
        for x, y in loader.iter_from(0):
            with accelerator.autocast():
                logits = model(x)
            if len(y) == 0:
                continue
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y.view(-1, 1))
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                 hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
        sums = accelerator.reduce(sums, reduction="sum")
        n = max(sums[3].item(), 1.0)
        return {"val_loss": sums[0].item() / n, "val_acc": sums[1].item() / n, "val_top5": sums[2].item() / n,
                "val_samples": int(sums[3].item())}


class TranslationTask(Task):
    name = "translation"

    def __init__(self, cfg, info: dict[str, Any], world_size: int = 1):
        super().__init__(cfg, info)
        self.world_size = world_size

    def model_input(self, batch) -> tuple:
        return (batch["src"], batch["tgt_in"])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Summed token loss / tokens of the GLOBAL batch x world size: after DDP's gradient mean this is
        exactly the per-token mean over the global batch, whatever the split of tokens across ranks."""
        logits = model(batch["src"], batch["tgt_in"])
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=self.info["pad_id"],
                              label_smoothing=self.cfg.optim.label_smoothing, reduction="sum")
        return nll * (self.world_size / max(1, int(batch["global_ntokens"])))

    def final_metrics(self, model: nn.Module, bundle, accelerator, run_dir: str) -> dict[str, Any]:
        """Detokenized BLEU / chrF (sacrebleu) of beam search on the test split; hypotheses to test.hyp."""
        import os

        from .backend import backend_name

        if not self.cfg.data.extra.get("bleu_at_end", True):
            return {}
        if backend_name(accelerator) in ("fsdp2", "fsdp1", "zero3"):
            # decoding bypasses the layers' forward, so sharded weights are never gathered
            return {"bleu_note": "skipped under a sharded backend; run `dist-sparse eval` on the checkpoint"}
        from .data.translation import evaluate_translation

        split = self.cfg.data.extra.get("bleu_split", "test")
        res = evaluate_translation(accelerator.unwrap_model(model), bundle, split=split,
                                   beam_size=int(self.cfg.data.extra.get("beam_size", 4)),
                                   limit=int(self.cfg.data.extra.get("bleu_limit", 0)) or None,
                                   out_path=os.path.join(run_dir, f"{split}.hyp"))
        return {k: v for k, v in res.items() if k in ("bleu", "chrf", "bleu_signature", "chrf_signature")}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, accelerator, epoch: int) -> dict[str, float]:
        device = accelerator.device
        pad = self.info["pad_id"]
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll (no smoothing), correct tokens, tokens
        for batch in loader.iter_from(0):
            with accelerator.autocast():
                logits = model(batch["src"], batch["tgt_in"])
            tgt = batch["tgt_out"].flatten()
            keep = tgt.ne(pad)
            logits = logits.float().flatten(0, 1)
            sums += torch.stack([F.cross_entropy(logits, tgt, ignore_index=pad, reduction="sum").double(),
                                 (logits.argmax(-1).eq(tgt) & keep).sum().double(), keep.sum().double()])
        sums = accelerator.reduce(sums, reduction="sum")
        n = max(sums[2].item(), 1.0)
        nll = sums[0].item() / n
        return {"val_loss": nll, "val_ppl": float(torch.tensor(nll).exp()), "val_acc": sums[1].item() / n,
                "val_tokens": int(sums[2].item())}


def load_teacher(cfg, info: dict[str, Any]) -> nn.Module:
    """The hard-distillation teacher of ``cfg.model``: an exported model file, or a model name with its
    local weights (every tensor must match: a teacher with a fresh head would teach noise)."""
    m = cfg.model
    if not m.teacher_checkpoint:
        from .checkpoint import load_exported

        teacher = load_exported(m.teacher)
    else:
        from .models.external import load_local_weights

        teacher = create_model(m.teacher, num_classes=m.num_classes or info.get("num_classes"),
                               in_chans=m.in_chans or info.get("in_chans"))
        load_local_weights(teacher, m.teacher_checkpoint, new_head_ok=False)
    for q in teacher.parameters():
        q.requires_grad_(False)
    return teacher.eval()


def make_task(task: str, cfg, info: dict[str, Any], world_size: int = 1) -> Task:
    if task == "translation":
        return TranslationTask(cfg, info, world_size)
    return ClassificationTask(cfg, info)
