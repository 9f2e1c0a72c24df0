"""Launched by test_backends.py under each backend (2 processes).

Checks, against one process computing the same global batch:
1. ``backend.backward``'s hook sees the full averaged gradient through ``distributed.full_grad``
   (under ZeRO the gradient lives in the optimizer, and accelerate's own backward already stepped);
2. ``gather_full(writeback=True)`` survives the next optimizer step: the new weight equals
   ``pruned - lr * grad`` (a stale DeepSpeed fp32 master copy would bring the old values back).
Prints one ``OK <backend>`` line on success; raises otherwise.
"""
from __future__ import annotations

import torch

from dist_sparse import distributed as D
from dist_sparse.backend import backend_name, backward, build_accelerator, reprepare

LR = 0.1


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def main() -> None:
    torch.set_num_threads(1)
    acc = build_accelerator("no", 1, per_rank_batch=4, grad_clip=0.0)
    world, rank = acc.num_processes, acc.process_index
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4 * world, 6, generator=g), torch.randn(4 * world, 3, generator=g)
    ref = _model()
    torch.nn.functional.mse_loss(ref(x), y).backward()  # the global batch in one process

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    pm, opt = reprepare(acc, model, opt)
    inner = acc.unwrap_model(pm)
    xs, ys = x[4 * rank:4 * rank + 4].to(acc.device), y[4 * rank:4 * rank + 4].to(acc.device)
    seen: dict[str, torch.Tensor] = {}

    def grab():
        for name, p in inner.named_parameters():
            seen[name] = D.full_grad(p).detach().cpu().float().clone()

    backward(acc, torch.nn.functional.mse_loss(pm(xs), ys), grab)
    opt.step()
    opt.zero_grad()
    for (name, got), want in zip(seen.items(), ref.parameters()):
        torch.testing.assert_close(got, want.grad, rtol=1e-5, atol=1e-6, msg=f"full_grad {name}")

    # prune every second entry of the first weight through the writeback path
    p0 = next(inner.parameters())
    with D.gather_full(p0, writeback=True) as w:
        keep = (torch.arange(w.numel()) % 2 == 0).reshape(w.shape).to(w.device)
        w.mul_(keep.to(w.dtype))
        pruned = w.detach().cpu().clone()
    seen.clear()
    backward(acc, torch.nn.functional.mse_loss(pm(xs), ys), grab)
    opt.step()
    opt.zero_grad()
    first = next(iter(seen))
    with D.gather_full(p0) as w:
        torch.testing.assert_close(w.detach().cpu().float(), pruned - LR * seen[first], rtol=1e-5, atol=1e-6,
                                   msg="weight after writeback + one SGD step")
    D.assert_same_across_ranks(pruned, "pruned weight")
    print(f"OK {backend_name(acc)} processes={world}", flush=True)
    acc.end_training()
    D.shutdown()  # a worker that leaves its process group alive can abort at exit (SIGABRT)


if __name__ == "__main__":
    main()
