"""Images per second of the decoded-image pipeline: 224-pixel JPEGs, each decoder, 0/1/2 workers, beside
the model's own training rate, all in one run.

The JPEGs are Fashion-MNIST test images upscaled to 256 x 256 RGB (bicubic, quality 90), written once
into a temporary ImageFolder; the pipeline is the one `dist-sparse train` builds for
``data.name: image_folder`` (RandomResizedCrop 224 + flip, or the DeiT recipe with ``--recipe timm``).
Each cell iterates the same batches of one epoch after a warm-up batch, alternating the cells
``--repeats`` times; the table gives the median.

    python benchmarks/input_pipeline.py --images 512 --batch 32 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _write_jpegs(root: str, n: int) -> None:
    import gzip

    import numpy as np
    from PIL import Image

    from dist_sparse.data.vision import find_fashion_mnist

    d = find_fashion_mnist()
    with gzip.open(os.path.join(d, "t10k-images-idx3-ubyte.gz")) as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(d, "t10k-labels-idx1-ubyte.gz")) as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8)
    for split, idx in (("train", range(n)), ("val", range(n, n + 64))):
        for i in idx:
            cdir = os.path.join(root, split, f"c{y[i]}")
            os.makedirs(cdir, exist_ok=True)
            Image.fromarray(x[i]).convert("RGB").resize((256, 256), Image.BICUBIC).save(
                os.path.join(cdir, f"{i}.jpg"), quality=90)


def _loader(root: str, decoder: str, workers: int, batch: int, recipe: str):
    from dist_sparse.config import load_config
    from dist_sparse.data import build_data

    extra = ["data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25", "data.interpolation=bicubic"] \
        if recipe == "timm" else []
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_resnet20_dense.yaml"), [
        "data.name=image_folder", f"data.root={root}", f"data.batch_size={batch}", "run.num_processes=0",
        "data.extra.img_size=224", "data.extra.channels=3", f"data.transform={recipe}", f"data.decoder={decoder}",
        f"data.num_workers={workers}", "run.channels_last=false", *extra])
    return build_data(cfg, rank=0, world_size=1, device="cpu", run_dir=root).train


def _rate(loader, epoch: int) -> float:
    it = loader.iter_from(epoch, 0)
    next(it)  # warm-up: worker start and the first batch
    n, t0 = 0, time.perf_counter()
    for x, _ in it:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def _model_rate(model_name: str, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from dist_sparse.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, stem="imagenet")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512, help="training JPEGs to write")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--recipe", default="rrc", choices=["rrc", "timm"])
    p.add_argument("--model", default="resnet50", help="model whose training rate is printed beside ('' skips)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the loading process itself; workers use 1 thread each (DataLoader default)
    workers = [int(w) for w in args.workers.split(",")]
    cells = [(dec, w) for dec in ("pil", "torchvision") for w in workers]
    with tempfile.TemporaryDirectory() as root:
        _write_jpegs(root, args.images)
        loaders = {c: _loader(root, c[0], c[1], args.batch, args.recipe) for c in cells}
        rates: dict[tuple, list[float]] = {c: [] for c in cells}
        for r in range(args.repeats):
            for c in cells:
                rates[c].append(_rate(loaders[c], epoch=r))
                print(f"repeat {r}: decoder={c[0]} workers={c[1]}: {rates[c][-1]:.0f} img/s", flush=True)
        for ld in loaders.values():
            ld.close()
    med = {c: statistics.median(v) for c, v in rates.items()}
    print(f"\n| decoder | workers | images/s (median of {args.repeats}) | vs 0 workers |")
    print("|---|---|---|---|")
    for dec, w in cells:
        print(f"| {dec} | {w} | {med[(dec, w)]:.0f} | {med[(dec, w)] / med[(dec, workers[0])]:.2f}x |")
    if args.model:
        torch.set_num_threads(os.cpu_count() or 1)
        rate = _model_rate(args.model, batch=8, steps=2)
        print(f"\n{args.model} training (fp32, batch 8, {torch.get_num_threads()} threads, this CPU): {rate:.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
