"""The example of docs/methods.md: a complete method in one file (the contract suite runs it too).

One-shot magnitude pruning: at optimizer step ``at_step`` each selected weight keeps its largest
``1 - sparsity`` fraction of entries (a global top-k over the full, possibly sharded tensor), and the
masks stay in force for the rest of training.
"""
from dataclasses import dataclass

from dist_sparse import distributed as D
from dist_sparse.methods import Method, MethodConfig, register_method
from dist_sparse.methods.masked import MaskSet
from dist_sparse.surgery.masking import sparsifiable_parameters


@dataclass
class OneShotConfig(MethodConfig):
    name: str = "oneshot"  # method name
    sparsity: float = 0.5  # fraction of every Conv/Linear weight removed at at_step
    at_step: int = 4  # the optimizer step after which the smallest weights are pruned


@register_method
class OneShot(Method):
    """Prune every Conv/Linear weight once by magnitude, then keep the masks."""

    name, Config = "oneshot", OneShotConfig

    def __init__(self, cfg, *, seed=0):
        super().__init__(cfg, seed=seed)
        self.masks = MaskSet()  # empty until the pruning step

    def prepare(self, model):  # pure: only applies the masks the state holds
        return self.masks.fold(model) if self.masks.masks else model

    def after_backward(self, model, step):
        self.masks.mask_grads(model)

    def after_step(self, model, step):
        if step == self.cfg.at_step:
            full = {}
            for n, p in sparsifiable_parameters(model):
                keep = D.full_numel(p) - int(self.cfg.sparsity * D.full_numel(p))
                with D.gather_full(p) as w:  # the decision on the full tensor: the same on every rank
                    full[n] = D.global_topk_mask(w.abs(), keep)
            self.masks = MaskSet(full)
            self.masks.apply_everywhere(model, self.optimizer)
        self.masks.apply(model)

    def finalize(self, model):
        return self.prepare(model)

    def report(self):
        return {"pruned": int(bool(self.masks.masks))}

    def state_dict(self):
        return {**super().state_dict(), "names": self.masks.names, "masks": self.masks.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.masks = MaskSet.from_state(state["masks"], state["names"])
