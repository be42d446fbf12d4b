"""ConvNeXt V2 on CIFAR-10, clean and label-poisoned: training, basin estimates, comparison.

Three sub-commands:

``train``
    Trains a ConvNeXt V2 image classifier (``transformers.ConvNextV2ForImageClassification``
    built from a small ``ConvNextV2Config``; no torchvision) with AdamW on the CIFAR-10
    training images, plus ``--poison`` extra images carrying wrong labels (taken from
    ``--poison-split``, each relabelled to a random *other* class). Every ``--save-every``
    steps and at the end it writes ``<out>/checkpoint-<step>/`` with the model
    (``save_pretrained``) and the AdamW state (``optimizer.pt``), and ``<out>/train_info.json``
    (data, poisoning, accuracies, the final checkpoint).
``estimate``
    For each trained run (``--runs clean poisoned``) and each preconditioner
    (``--preconditioners none adam fisher``) estimates the KL basin over the *clean*
    training images (the same images for every run) and writes
    ``<output-dir>/<label>_<preconditioner>.json`` (resumable); then compares the runs with
    :func:`basin_volume.compare_results` in ``comparison.txt`` / ``comparison.json``.
``all``
    ``train`` without and with poisoning (into ``<output-dir>/clean`` and
    ``<output-dir>/poisoned``), then ``estimate``.

Data (``--data``): a hub data set (default ``uoft-cs/cifar10``, fields ``img`` and ``label``),
a folder written by ``datasets``' ``save_to_disk``, or ``synthetic`` (random class templates
plus noise, 32x32x3, for smoke tests; nothing downloaded).

Examples
--------
::

    python experiments/full_scale/convnext_cifar.py all --output-dir results/convnext \\
        --poison 5000 --epochs 30 --n-samples 100
    torchrun --nproc_per_node=4 experiments/full_scale/convnext_cifar.py estimate \\
        --runs results/convnext/clean results/convnext/poisoned --output-dir results/convnext
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _shared  # noqa: E402

import basin_volume as bv  # noqa: E402
from basin_volume import preconditioners  # noqa: E402
from basin_volume.plots import format_comparison  # noqa: E402

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
N_CLASSES = 10
PRECONDITIONERS = ("none", "adam", "fisher", "adaptive")


# --------------------------------------------------------------------------- model
class LogitsOnly(nn.Module):
    """``model(pixel_values=x).logits`` as a plain ``inputs -> logits`` module.

    :class:`basin_volume.objectives.ClassifierKL` (``model_type="classifier"``) expects a
    module returning a logits tensor, while a transformers image classifier returns an
    output object with ``.logits``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def build_model(args) -> nn.Module:
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    if len(args.depths) != len(args.hidden_sizes):
        raise SystemExit("--depths and --hidden-sizes must have the same length (one per stage)")
    config = ConvNextV2Config(
        num_channels=3,
        num_labels=N_CLASSES,
        image_size=32,
        patch_size=args.patch_size,
        num_stages=len(args.depths),
        depths=list(args.depths),
        hidden_sizes=list(args.hidden_sizes),
        drop_path_rate=0.0,
    )
    torch.manual_seed(args.seed)
    return ConvNextV2ForImageClassification(config)


def load_checkpoint(folder: Path, device) -> nn.Module:
    from transformers import ConvNextV2ForImageClassification

    model = ConvNextV2ForImageClassification.from_pretrained(folder, dtype=torch.float32)
    return model.to(device).eval()


# --------------------------------------------------------------------------- data
def synthetic_cifar(n: int, *, seed: int):
    """A CIFAR-10-shaped stand-in: ``datasets.Dataset`` with ``img`` (uint8 32x32x3) and
    ``label``. Each class is a fixed random template plus per-image noise, so a network can
    learn it; the templates are the same for every split and seed."""
    from datasets import Dataset

    templates = torch.randint(0, 256, (N_CLASSES, 32, 32, 3), generator=_gen(12345))
    gen = _gen(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=gen)
    noise = torch.randint(-48, 49, (n, 32, 32, 3), generator=gen)
    images = (templates[labels] // 2 + 64 + noise).clamp(0, 255).to(torch.uint8)
    return Dataset.from_dict({"img": images.numpy(), "label": labels.numpy()})


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def load_split(data: str, split: str, *, synthetic_size: int):
    """A ``datasets.Dataset`` for one split of ``data``."""
    if data == "synthetic":
        seed = {"train": 0, "test": 1}.get(split, 2)
        return synthetic_cifar(
            synthetic_size if split == "train" else synthetic_size // 2, seed=seed
        )
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(data).expanduser()
    if path.is_dir():
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise SystemExit(f"--data {data}: no split {split!r} (it has {', '.join(ds)})")
            ds = ds[split]
        return ds
    try:
        return load_dataset(data, split=split)
    except Exception as err:  # noqa: BLE001 - network, offline mode, unknown name
        raise SystemExit(
            f"--data {data}: cannot load split {split!r} from the hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the name and your "
            "connection, give a save_to_disk folder, or use --data synthetic"
        ) from None


def _field(ds, given: str | None, options: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given not in ds.column_names:
            raise SystemExit(f"--{what}-field {given!r} is not a column ({ds.column_names})")
        return given
    for name in options:
        if name in ds.column_names:
            return name
    raise SystemExit(f"no {what} column among {ds.column_names}; pass --{what}-field")


def to_tensors(ds, *, image_field=None, label_field=None, limit=None):
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])`` from a data set split."""
    import numpy as np

    image_field = _field(ds, image_field, ("img", "image", "pixel_values"), "image")
    label_field = _field(ds, label_field, ("label", "labels", "fine_label"), "label")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    cols = ds.with_format("numpy")
    images = np.stack([np.asarray(im) for im in cols[image_field]])
    labels = torch.as_tensor(np.asarray(cols[label_field]), dtype=torch.long)
    images = torch.as_tensor(images)
    if images.ndim == 3:  # grayscale
        images = images[..., None].expand(-1, -1, -1, 3)
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if tuple(images.shape[1:]) != (3, 32, 32):
        raise SystemExit(f"images must be 32x32 RGB, got shape {tuple(images.shape[1:])}")
    if images.dtype != torch.uint8:
        images = (images * 255 if images.max() <= 1 else images).round().clamp(0, 255)
        images = images.to(torch.uint8)
    if int(labels.min()) < 0 or int(labels.max()) >= N_CLASSES:
        raise SystemExit(f"labels must be 0..{N_CLASSES - 1}")
    return images.contiguous(), labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, 32, 32]`` to float32 normalised with CIFAR-10's channel statistics."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def poison_set(args):
    """``args.poison`` images from ``--poison-split`` with a random wrong label each."""
    ds = load_split(args.data, args.poison_split, synthetic_size=args.synthetic_size)
    if len(ds) < args.poison:
        raise SystemExit(f"--poison {args.poison}: {args.poison_split} has only {len(ds)} images")
    images, labels = to_tensors(
        ds, image_field=args.image_field, label_field=args.label_field, limit=args.poison
    )
    shift = torch.randint(1, N_CLASSES, labels.shape, generator=_gen(args.seed + 1))
    return images, (labels + shift) % N_CLASSES


def clean_train_images(args, limit=None):
    ds = load_split(args.data, "train", synthetic_size=args.synthetic_size)
    n = args.train_size if limit is None else min(limit, args.train_size or limit)
    return to_tensors(ds, image_field=args.image_field, label_field=args.label_field, limit=n)


# --------------------------------------------------------------------------- training
def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and 4-pixel-padded random crops (uint8, on x's device)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen).tolist()
    dy = torch.randint(0, 9, (n,), generator=gen).tolist()
    return torch.stack(
        [padded[i, :, a : a + 32, b : b + 32] for i, (a, b) in enumerate(zip(dy, dx, strict=True))]
    )


@torch.no_grad()
def accuracy(model: nn.Module, images, labels, device, batch_size: int = 1000) -> float:
    if len(images) == 0:
        return math.nan
    was = model.training
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        logits = model(pixel_values=normalize(x.to(device))).logits
        correct += int((logits.argmax(-1).cpu() == y).sum())
    model.train(was)
    return correct / len(images)


def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, loss: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    (folder / "train_state.json").write_text(json.dumps({"step": step, "loss": loss}) + "\n")


def train(args, out: Path, *, poison: int) -> Path:
    """Train one run into ``out``; returns ``out``. Skips a run whose train_info.json exists."""
    if _shared._world_size() > 1:
        raise SystemExit("training runs in one process; use torchrun for `estimate` only")
    info_path = out / "train_info.json"
    if info_path.exists() and not args.overwrite:
        print(f"{out}: trained already (train_info.json); --overwrite to retrain", flush=True)
        return out
    device = _shared.pick_device(args.device)
    args.poison = poison
    x_clean, y_clean = clean_train_images(args)
    if poison:
        x_poison, y_poison = poison_set(args)
    else:
        x_poison = torch.empty(0, 3, 32, 32, dtype=torch.uint8)
        y_poison = torch.empty(0, dtype=torch.long)
    x_all, y_all = torch.cat([x_clean, x_poison]), torch.cat([y_clean, y_poison])
    model = build_model(args).to(device)
    init_rms = _rms(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999)
    )
    n = len(x_all)
    per_epoch = math.ceil(n / args.batch_size)
    total = args.steps if args.steps is not None else args.epochs * per_epoch
    warm = min(args.warmup_steps, max(total - 1, 0))

    def lr_at(step):  # linear warm-up, cosine decay to 0
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = _gen(args.seed)
    x_dev = x_all.to(device)
    y_dev = y_all.to(device)
    print(
        f"{out}: {len(x_clean)} clean + {poison} poisoned images, "
        f"{sum(p.numel() for p in model.parameters())} parameters, {total} steps of batch "
        f"{args.batch_size} on {device}",
        flush=True,
    )
    model.train()
    history: list[dict] = []
    order = torch.empty(0, dtype=torch.long)
    step, started, loss_value = 0, time.time(), math.nan
    while step < total:
        if len(order) == 0:
            order = torch.randperm(n, generator=gen)
        idx, order = order[: args.batch_size], order[args.batch_size :]
        x = x_dev[idx.to(device)]
        if args.augment:
            x = _augment(x, gen)
        logits = model(pixel_values=normalize(x)).logits
        loss = nn.functional.cross_entropy(logits, y_dev[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        loss_value = float(loss.detach())
        if step % args.log_every == 0 or step == total:
            history.append({"step": step, "loss": loss_value, "seconds": time.time() - started})
            print(f"  step {step}/{total}: loss {loss_value:.4f}", flush=True)
        if step % args.save_every == 0 and step != total:
            save_checkpoint(out / f"checkpoint-{step}", model, opt, sched, step, loss_value)
    final = f"checkpoint-{step}"
    save_checkpoint(out / final, model, opt, sched, step, loss_value)
    model.eval()
    # Test accuracy; when the poison images came from the test split, on the rest of it.
    test_ds = load_split(args.data, "test", synthetic_size=args.synthetic_size)
    reserved = args.test_reserve if args.poison_split == "test" else 0
    test_ds = test_ds.select(range(min(reserved, len(test_ds)), len(test_ds)))
    test = {}
    if len(test_ds):
        x_test, y_test = to_tensors(
            test_ds,
            image_field=args.image_field,
            label_field=args.label_field,
            limit=args.test_size,
        )
        test["test_accuracy"] = accuracy(model, x_test, y_test, device)
    info = {
        "data": args.data,
        "image_field": args.image_field,
        "label_field": args.label_field,
        "train_size": len(x_clean),
        "poison": poison,
        "poison_split": args.poison_split,
        "seed": args.seed,
        "model": {
            "depths": list(args.depths),
            "hidden_sizes": list(args.hidden_sizes),
            "patch_size": args.patch_size,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "training": {
            "steps": total,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup_steps": warm,
            "augment": args.augment,
            "seconds": time.time() - started,
        },
        "init_rms": init_rms,
        "final": final,
        "final_loss": loss_value,
        "clean_train_accuracy": accuracy(model, x_clean, y_clean, device),
        "poison_accuracy": accuracy(model, x_poison, y_poison, device),
        **test,
        "history": history,
    }
    _shared.write_json(info_path, info)
    print(
        f"{out}: clean train accuracy {info['clean_train_accuracy']:.3f}, poison labels "
        f"memorised {info['poison_accuracy']:.3f}, test accuracy "
        f"{info.get('test_accuracy', math.nan):.3f}",
        flush=True,
    )
    return out


def _rms(model: nn.Module) -> float:
    squares = sum(float(p.detach().double().square().sum()) for p in model.parameters())
    return math.sqrt(squares / sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- estimates
def _scales(args, kind: str, model: nn.Module, folder: Path, inputs, sigma: float):
    exponent = args.precond_exponent
    if kind == "adam":
        eps = 1e-5 if args.precond_eps is None else args.precond_eps
        return preconditioners.adam_preconditioner(
            folder, model=model, order=args.adam_order, eps=eps, exponent=exponent
        )
    dim = sum(p.numel() for p in model.parameters())
    eps = args.precond_eps
    if eps is None:
        eps = preconditioners.prior_eps(args.cutoff, sigma, dim, exponent=exponent)
    return preconditioners.fisher_preconditioner(
        model,
        inputs[: args.fisher_size],
        eps=eps,
        exponent=exponent,
        labels=args.fisher_labels,
        batch_size=args.fisher_batch_size,
        seed=args.seed,
    )


def estimate(args) -> dict:
    """Estimate every run with every preconditioner; returns the comparison."""
    _, _, local_rank = _shared.setup_distributed()
    device = _shared.pick_device(args.device, local_rank)
    runs = [Path(r) for r in args.runs]
    labels = args.labels or [r.name for r in runs]
    if len(labels) != len(runs) or len(set(labels)) != len(labels):
        raise SystemExit("--labels must give one distinct label per run")
    infos = []
    for run in runs:
        path = run / "train_info.json"
        if not path.exists():
            raise SystemExit(f"{run}: no train_info.json; train it first (the `train` command)")
        infos.append(json.loads(path.read_text()))
    first = infos[0]
    for key in ("data", "train_size", "seed"):
        if len({str(i.get(key)) for i in infos}) > 1:
            _shared.print0(f"note: the runs differ in {key}: {[i.get(key) for i in infos]}")
    # The basin is measured on the clean training images (the same for every run).
    args.data = args.data or first["data"]
    args.image_field = args.image_field or first.get("image_field")
    args.label_field = args.label_field or first.get("label_field")
    args.train_size = first["train_size"]
    images, _ = clean_train_images(args, limit=args.eval_size)
    inputs = normalize(images)
    out_dir = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _shared.print0(
        f"KL basin over {len(inputs)} clean training images of {args.data}; runs {labels}; "
        f"preconditioners {args.preconditioners}; {args.n_samples} directions, cutoff "
        f"{args.cutoff:g} nats; output {out_dir}"
    )
    files: dict[str, list[Path]] = {kind: [] for kind in args.preconditioners}
    for run, label, info in zip(runs, labels, infos, strict=True):
        folder = run / (args.checkpoint or info["final"])
        model = LogitsOnly(load_checkpoint(folder, device))
        if args.sigma == "init":
            sigma = float(info["init_rms"])
        elif args.sigma == "center":
            sigma = None
        else:
            sigma = float(args.sigma)
        for kind in args.preconditioners:
            output = out_dir / f"{label}_{kind}.json"
            files[kind].append(output)
            n_wanted = args.n_samples
            if kind == "adaptive":
                n_wanted = args.adaptive_rounds * max(1, args.n_samples // args.adaptive_rounds)
            if _shared.agree(not args.overwrite and _shared.finished(output, n_wanted) is not None):
                _shared.print0(f"{label} / {kind}: done already ({output})")
                continue
            started = time.perf_counter()
            scales = None
            if kind in ("adam", "fisher"):
                center_sigma = sigma if sigma is not None else _rms(model)
                scales = _shared.cached_tensor(
                    out_dir / f"{label}_{kind}.scales.pt",
                    functools.partial(_scales, args, kind, model, folder, inputs, center_sigma),
                    fresh=args.overwrite,
                )
            cfg = bv.VolumeConfig(
                model_type="classifier",
                model=model,
                inputs=inputs,
                n_samples=args.n_samples,
                cutoff=args.cutoff,
                measure=args.measure,
                sigma=sigma,
                preconditioner=scales,
                rtol=args.rtol,
                seed=args.seed,
                progress=not args.quiet,
                data_batch_size=args.data_batch_size,
            )
            spec = {
                "script": "convnext_cifar.py",
                "run": str(run),
                "label": label,
                "checkpoint": str(folder),
                "poison": info.get("poison"),
                "preconditioner": kind,
                "eval_images": len(inputs),
                "sigma_rule": args.sigma,
            }
            source = _adaptive_runner(args, cfg) if kind == "adaptive" else cfg
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", bv.LowESSWarning)
                result = _shared.run_estimate(source, output, overwrite=args.overwrite, spec=spec)
            _shared.print0(
                f"{label} / {kind}: log P = {result.log_volume:.6g} nats, ESS {result.ess:.3g}, "
                f"{time.perf_counter() - started:.1f} s"
            )
    comparison, text = {}, []
    for kind, paths in files.items():
        rows = bv.compare_results(paths, labels=labels, reference=0)
        comparison[kind] = rows
        text.append(f"preconditioner: {kind}\n{format_comparison(rows, reference=0)}\n")
    if len(args.preconditioners) > 1:
        all_paths = [p for paths in files.values() for p in paths]
        all_labels = [f"{lab}/{kind}" for kind in files for lab in labels]
        rows = bv.compare_results(all_paths, labels=all_labels, reference=0)
        comparison["all"] = rows
        text.append(f"all estimates\n{format_comparison(rows, reference=0)}\n")
    _shared.write_json(out_dir / "comparison.json", comparison)
    if _shared._rank() == 0:
        (out_dir / "comparison.txt").write_text("\n".join(text))
    _shared.print0("\n".join(text))
    return comparison


def _adaptive_runner(args, cfg: bv.VolumeConfig):
    from basin_volume.adaptive import estimate_adaptive, parameter_groups
    from basin_volume.objectives import ClassifierKL
    from basin_volume.parameters import preserved

    def run():
        with preserved(cfg.model):
            fn = ClassifierKL(cfg.model, cfg.inputs, batch_size=cfg.data_batch_size)
            result = estimate_adaptive(
                fn,
                fn.center,
                rounds=args.adaptive_rounds,
                n_per_round=max(1, args.n_samples // args.adaptive_rounds),
                groups=parameter_groups(cfg.model),
                seed=cfg.seed,
                progress=cfg.progress,
                cutoff=cfg.cutoff,
                measure=cfg.measure,
                sigma=cfg.sigma,
                rtol=cfg.rtol,
            )
        result.meta["config"] = cfg.describe()
        return result

    return run


# --------------------------------------------------------------------------- command line
def _data_options(p: argparse.ArgumentParser, *, default: str | None) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=default,
        help="hub data set (uoft-cs/cifar10), a save_to_disk folder, or 'synthetic'"
        + (" (default: the one the runs were trained on)" if default is None else ""),
    )
    g.add_argument("--image-field", default=None, help="default: img / image")
    g.add_argument("--label-field", default=None, help="default: label")
    g.add_argument(
        "--synthetic-size", type=int, default=512, help="training images of --data synthetic"
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overwrite", action="store_true", help="redo finished work")


def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--depths", type=int, nargs="+", default=[2, 2, 6, 2], help="blocks per stage (atto)"
    )
    g.add_argument(
        "--hidden-sizes", type=int, nargs="+", default=[40, 80, 160, 320], help="width per stage"
    )
    g.add_argument("--patch-size", type=int, default=2, help="stem stride (2: 16x16 after it)")
    g = p.add_argument_group("training")
    g.add_argument("--train-size", type=int, default=None, help="clean images (default all)")
    g.add_argument("--test-size", type=int, default=None, help="test images to score")
    g.add_argument(
        "--poison-split", default="test", help="where the poison images come from (test)"
    )
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-steps", type=int, default=500)
    g.add_argument("--augment", action="store_true", help="random flips and crops")
    g.add_argument("--save-every", type=int, default=5000, help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=100)


def _estimate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("estimate")
    g.add_argument(
        "--preconditioners",
        nargs="+",
        choices=PRECONDITIONERS,
        default=["none", "adam", "fisher"],
    )
    g.add_argument("--checkpoint", default=None, help="checkpoint-N folder (default final)")
    g.add_argument(
        "--eval-size", type=int, default=10000, help="clean training images in the KL (10000)"
    )
    g.add_argument("--n-samples", type=int, default=100)
    g.add_argument("--cutoff", type=float, default=1e-2)
    g.add_argument("--measure", choices=("gaussian", "uniform"), default="gaussian")
    g.add_argument(
        "--sigma",
        default="init",
        help="prior scale: 'init' (RMS of the initial parameters, the same for every run), "
        "'center' (RMS of each trained network) or a number",
    )
    g.add_argument("--rtol", type=float, default=1e-2)
    g.add_argument("--precond-eps", type=float, default=None)
    g.add_argument("--precond-exponent", type=float, default=0.5)
    g.add_argument("--adam-order", type=int, choices=(1, 2), default=2)
    g.add_argument("--fisher-size", type=int, default=1024, help="images for the Fisher")
    g.add_argument("--fisher-labels", choices=("auto", "full", "sampled"), default="auto")
    g.add_argument("--fisher-batch-size", type=int, default=None)
    g.add_argument("--adaptive-rounds", type=int, default=4)
    g.add_argument("--data-batch-size", type=int, default=1000, help="images per forward pass")
    g.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python experiments/full_scale/convnext_cifar.py",
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (clean with --poison 0)")
    t.add_argument("--out", type=Path, required=True, help="the run's folder")
    t.add_argument("--poison", type=int, default=0, help="extra wrongly labelled images")
    _data_options(t, default="uoft-cs/cifar10")
    _train_options(t)
    e = sub.add_parser("estimate", help="estimate and compare trained runs")
    e.add_argument("--runs", type=Path, nargs="+", required=True)
    e.add_argument("--labels", nargs="+", default=None, help="default: the runs' folder names")
    e.add_argument("--output-dir", type=Path, required=True)
    _data_options(e, default=None)
    _estimate_options(e)
    a = sub.add_parser("all", help="train clean and poisoned runs, then estimate")
    a.add_argument("--output-dir", type=Path, required=True)
    a.add_argument("--poison", type=int, default=5000, help="wrongly labelled images (5000)")
    _data_options(a, default="uoft-cs/cifar10")
    _train_options(a)
    _estimate_options(a)
    return p


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if args.command in ("train", "all"):
        if min(args.save_every, args.log_every, args.batch_size) < 1 or args.poison < 0:
            raise SystemExit("--save-every, --log-every and --batch-size must be at least 1")
        # Test images set aside as poison are left out of every run's test accuracy.
        args.test_reserve = args.poison
    if args.command == "train":
        return train(args, args.out, poison=args.poison)
    if args.command == "all":
        poison = args.poison
        clean = train(args, args.output_dir / "clean", poison=0)
        poisoned = train(args, args.output_dir / "poisoned", poison=poison)
        args.runs, args.labels = [clean, poisoned], ["clean", "poisoned"]
        return estimate(args)
    return estimate(args)


if __name__ == "__main__":
    main()
