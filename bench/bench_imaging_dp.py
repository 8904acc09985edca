"""Privacy cost of training the imaging models: DP-SGD step time over plain SGD step time.

Target (the imaging issue): a DP-SGD step costs at most 1.8x a non-private step for the
2D CNN (``cnn2d``) at batch 64. The 3D CNN (``cnn3d``, at batch 16) is reported too, for
information only.

Both paths train the same model (``build_imaging_model(name, shape, seed)``) on the same
synthetic images (radiographs / CT volumes from ``medfed.simulations.synthetic_imaging``,
scaled to [0, 1]), with a fixed number of torch threads (1 by default, as the sites run),
in one process:

- DP-SGD is Opacus exactly as ``medfed.client.training.train_dp`` sets it up: the keyword
  arguments of its ``PrivacyEngine.make_private`` call are captured from a real (tiny)
  ``train_dp`` call on the imaging model and reused (hooks mode, Poisson sampling,
  per-sample clipping, Gaussian noise);
- plain SGD is ``torch.optim.SGD`` on an unwrapped copy of the same model, on the very
  same batches (the Poisson batches drawn for DP, so both paths do the same amount of
  work; their mean size is printed).

Batches are drawn up front, so one timed step is zero_grad + forward + backward +
optimizer step (clip + noise + update for DP), without data loading. Every block runs
once through the same list of batches; blocks of the two paths are interleaved in a
shuffled order per repeat. The verdict's ratio is median(DP) / median(plain) per step;
the median of same-repeat ratios and min/min are shown too (steadier when the machine's
load drifts).

``--explore`` times the candidate architectures that ``medfed.common.imaging_models``
was chosen from (its docstring records the figures).

Usage::

    python bench/bench_imaging_dp.py [--quick] [--explore] [--threads 1] [--repeats N]
                                     [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import default_out, environment, load_average, print_table, write_json
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAME = "bench_imaging_dp"
TARGET_RATIO = 1.8
TARGET_MODEL = "cnn2d"
BATCH = {"cnn2d": 64, "cnn3d": 16}
STEPS_SCALE = {"cnn2d": 1.0, "cnn3d": 0.25}  # a 3D step is ~4-6x slower: shorter blocks
SHAPE = {"cnn2d": (1, 64, 64), "cnn3d": (1, 16, 64, 64)}
NOISE, CLIP, LR = 1.0, 1.0, 0.5


# -- data -------------------------------------------------------------------------------
def synthetic_images(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic radiographs (cnn2d) or CT volumes (cnn3d) in [0, 1], half positive."""
    from medfed.simulations.synthetic_imaging import _ct_volume, _radiograph

    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    rng.shuffle(y)
    if name == "cnn2d":
        size = SHAPE[name][-1]
        X = np.stack([_radiograph(rng, size, int(label)) for label in y]) / 1000.0
    else:
        depth, size = SHAPE[name][1], SHAPE[name][-1]
        hu = np.stack([_ct_volume(rng, size, depth, int(label)) for label in y])
        X = np.clip((hu + 1000.0) / 1400.0, 0.0, 1.0)  # public window: -1000 .. 400 HU
    return X[:, None].astype(np.float32), y


# -- the medfed DP path -----------------------------------------------------------------
def captured_make_private_kwargs(name: str) -> dict[str, Any]:
    """Run medfed's ``train_dp`` once on a tiny imaging set; capture make_private's kwargs."""
    from opacus import PrivacyEngine

    from medfed.client import training
    from medfed.common.imaging_models import build_imaging_model

    captured: dict[str, Any] = {}
    original = PrivacyEngine.make_private

    def spy(self, **kwargs):
        captured.update(kwargs)
        return original(self, **kwargs)

    X, y = synthetic_images(name, 8, seed=99)
    tiny = training.DPSettings(
        noise_multiplier=NOISE, max_grad_norm=CLIP, batch_size=4, local_epochs=1, learning_rate=LR
    )
    PrivacyEngine.make_private = spy
    try:
        training.train_dp(build_imaging_model(name, SHAPE[name], 0), X, y, True, tiny)
    finally:
        PrivacyEngine.make_private = original
    if not captured:
        raise SystemExit("error: train_dp did not call PrivacyEngine.make_private")
    return {k: v for k, v in captured.items() if k not in ("module", "optimizer", "data_loader")}


def make_dp(model: nn.Module, X, y, batch_size: int, kwargs: dict[str, Any]):
    """Opacus as train_dp sets it up: (private model, DP optimizer, Poisson loader)."""
    from opacus import PrivacyEngine

    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, **kwargs
        )


def poisson_batches(loader, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` non-empty batches from Opacus' Poisson loader (an empty one is a rarity)."""
    torch.manual_seed(seed)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < count:
        out.extend((xb, yb) for xb, yb in loader if len(xb))
    return out[:count]


class Trainer:
    """A model + optimizer + loss taking timed steps over a fixed list of batches."""

    def __init__(self, name: str, model: nn.Module, optimizer, batches) -> None:
        self.name, self.model, self.optimizer, self.batches = name, model, optimizer, batches
        self.criterion = nn.BCEWithLogitsLoss()
        self.per_step: list[float] = []
        self.backward: list[float] = []  # zero_grad + forward + backward
        self.update: list[float] = []  # optimizer.step (clip + noise + update for DP)

    def block(self, record: bool = True) -> None:
        """One pass over the batches; records seconds per step."""
        clock = time.perf_counter
        backward = update = 0.0
        self.model.train()
        for xb, yb in self.batches:
            t0 = clock()
            self.optimizer.zero_grad(set_to_none=True)
            self.criterion(self.model(xb), yb).backward()
            t1 = clock()
            self.optimizer.step()
            update += clock() - t1
            backward += t1 - t0
        if record:
            n = len(self.batches)
            self.per_step.append((backward + update) / n)
            self.backward.append(backward / n)
            self.update.append(update / n)


def time_pair(
    label: str,
    build: Callable[[], nn.Module],
    X: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    kwargs: dict[str, Any],
    repeats: int,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Interleaved blocks of plain SGD and DP-SGD on the same model and batches."""
    base = build()
    params = sum(p.numel() for p in base.parameters())
    dp_model, dp_opt, loader = make_dp(copy.deepcopy(base), X, y, batch_size, kwargs)
    batches = poisson_batches(loader, steps, seed)
    plain_model = copy.deepcopy(base)
    paths = [
        Trainer(
            "plain SGD", plain_model, torch.optim.SGD(plain_model.parameters(), lr=LR), batches
        ),
        Trainer("DP-SGD", dp_model, dp_opt, batches),
    ]
    for path in paths:  # warm-up
        path.block(record=False)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(paths)
        for path in paths:
            path.block()
    plain, dp = sorted(paths, key=lambda p: p.name != "plain SGD")
    ms = 1000.0
    return {
        "model": label,
        "parameters": params,
        "batch_size": batch_size,
        "mean_batch_size": float(np.mean([len(xb) for xb, _ in batches])),
        "steps_per_block": steps,
        "repeats": repeats,
        "plain_ms": ms * statistics.median(plain.per_step),
        "dp_ms": ms * statistics.median(dp.per_step),
        "plain_min_ms": ms * min(plain.per_step),
        "dp_min_ms": ms * min(dp.per_step),
        "plain_backward_ms": ms * statistics.median(plain.backward),
        "dp_backward_ms": ms * statistics.median(dp.backward),
        "plain_update_ms": ms * statistics.median(plain.update),
        "dp_update_ms": ms * statistics.median(dp.update),
        "ratio": statistics.median(dp.per_step) / statistics.median(plain.per_step),
        "paired_ratio": statistics.median(
            d / p for d, p in zip(dp.per_step, plain.per_step, strict=True)
        ),
        "min_ratio": min(dp.per_step) / min(plain.per_step),
        "plain_blocks_ms": [ms * t for t in plain.per_step],
        "dp_blocks_ms": [ms * t for t in dp.per_step],
    }


# -- candidates (--explore) -------------------------------------------------------------
class _SlicesAsChannels(nn.Module):
    """2.5D candidate for volumes: the D slices become the channels of a 2D CNN."""

    def __init__(self, depth: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        from medfed.common.imaging_models import ConvNet2d

        self.net = ConvNet2d(channels, in_channels=depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.squeeze(1))


class _PooledStem2d(nn.Module):
    """Candidate: stride-1 3x3 convs with 2x2 max-pooling between them (the classic CNN)."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, padding=1),
                nn.GroupNorm(max(1, width // 4), width, affine=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x * 2.0 - 1.0).flatten(2)
        return self.head(torch.cat([h.mean(2), h.amax(2)], 1)).squeeze(-1)


def _affine_norms(model: nn.Module) -> nn.Module:
    """Candidate: the same model with learned GroupNorm scale and shift (Opacus hooks them)."""
    for parent in model.modules():
        for key, child in parent.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(parent, key, nn.GroupNorm(child.num_groups, child.num_channels))
    return model


def candidates() -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """label -> (data kind, seeded builder)."""
    from medfed.common.imaging_models import ConvNet2d, ConvNet3d, build_imaging_model

    def seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            torch.manual_seed(0)
            return make()

        return build

    return {
        "cnn2d (chosen) s2 8-16-32": (
            "cnn2d",
            lambda: build_imaging_model("cnn2d", SHAPE["cnn2d"], 0),
        ),
        "2d s2 8-16-32 affine GroupNorm": (
            "cnn2d",
            seeded(lambda: _affine_norms(ConvNet2d((8, 16, 32)))),
        ),
        "2d s2 16-32-64": ("cnn2d", seeded(lambda: ConvNet2d((16, 32, 64)))),
        "2d s2 8-16-32-64": ("cnn2d", seeded(lambda: ConvNet2d((8, 16, 32, 64)))),
        "2d s2 4-8-16": ("cnn2d", seeded(lambda: ConvNet2d((4, 8, 16)))),
        "2d s1 3x3 + maxpool 8-16-32": ("cnn2d", seeded(lambda: _PooledStem2d((8, 16, 32)))),
        "cnn3d (chosen) 3D 8-16-32": (
            "cnn3d",
            lambda: build_imaging_model("cnn3d", SHAPE["cnn3d"], 0),
        ),
        "3d 8-16-32 affine GroupNorm": (
            "cnn3d",
            seeded(lambda: _affine_norms(ConvNet3d((8, 16, 32)))),
        ),
        "3d 4-8-16": ("cnn3d", seeded(lambda: ConvNet3d((4, 8, 16)))),
        "2.5d slices-as-channels 16-32-64": (
            "cnn3d",
            seeded(lambda: _SlicesAsChannels(SHAPE["cnn3d"][1], (16, 32, 64))),
        ),
    }


# -- main -------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats of 10-step blocks")
    parser.add_argument("--explore", action="store_true", help="also time the candidates")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="blocks per path (15)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"JSON path (default results/{NAME}.json)")
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 15)
    steps = args.steps or (10 if args.quick else 20)
    # As in train_dp: Opacus' secure-mode notice and torch's "no input needs a gradient"
    # note on the full backward hooks change nothing in the computation.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    env = environment()
    print(
        f"torch threads: {torch.get_num_threads()}; {repeats} interleaved blocks of {steps} "
        f"steps per path; load average {env['load_average']}"
    )

    from medfed.common.imaging_models import IMAGING_MODELS, build_imaging_model

    data = {name: synthetic_images(name, 4 * BATCH[name] * 4, args.seed) for name in SHAPE}
    kwargs = {name: captured_make_private_kwargs(name) for name in IMAGING_MODELS}
    plan: list[tuple[str, str, Callable[[], nn.Module]]] = [
        (name, name, lambda name=name: build_imaging_model(name, SHAPE[name], args.seed))
        for name in IMAGING_MODELS
    ]
    if args.explore:
        plan += [(label, kind, b) for label, (kind, b) in candidates().items()]
    results = []
    for label, kind, build in plan:
        X, y = data[kind]
        kind_steps = max(2, round(steps * STEPS_SCALE[kind]))
        results.append(
            time_pair(label, build, X, y, BATCH[kind], kwargs[kind], repeats, kind_steps, args.seed)
        )
        r = results[-1]
        print(f"  {label}: DP {r['dp_ms']:.1f} ms / plain {r['plain_ms']:.1f} ms", flush=True)

    print_table(
        f"per-step time (zero_grad + forward + backward + step), median of {repeats} blocks "
        f"(cnn2d: {steps} steps each), {torch.get_num_threads()} thread(s)",
        [
            "model",
            "params",
            "batch",
            "plain ms",
            "DP ms",
            "plain fwd+bwd",
            "DP fwd+bwd",
            "DP step",
            "x plain",
            "paired",
            "min/min",
        ],
        [
            [
                r["model"],
                r["parameters"],
                round(r["mean_batch_size"], 1),
                r["plain_ms"],
                r["dp_ms"],
                r["plain_backward_ms"],
                r["dp_backward_ms"],
                r["dp_update_ms"],
                r["ratio"],
                r["paired_ratio"],
                r["min_ratio"],
            ]
            for r in results
        ],
        digits=2,
    )
    verdict = [
        {
            "model": r["model"],
            "ratio": r["ratio"],
            "paired_ratio": r["paired_ratio"],
            "target_ratio": TARGET_RATIO if r["model"] == TARGET_MODEL else None,
            "passed": r["ratio"] <= TARGET_RATIO if r["model"] == TARGET_MODEL else None,
        }
        for r in results
        if r["model"] in IMAGING_MODELS
    ]
    passed = next(v["passed"] for v in verdict if v["model"] == TARGET_MODEL)
    print_table(
        f"verdict (target: DP-SGD step <= {TARGET_RATIO:g}x plain for {TARGET_MODEL}; "
        "cnn3d for information)",
        ["model", "x plain", "paired", "target", "pass"],
        [
            [v["model"], v["ratio"], v["paired_ratio"], v["target_ratio"], v["passed"]]
            for v in verdict
        ],
        digits=2,
    )
    write_json(
        args.out or default_out(NAME),
        {
            "benchmark": NAME,
            "target": f"DP-SGD step <= {TARGET_RATIO:g}x non-private step ({TARGET_MODEL}, "
            f"batch {BATCH[TARGET_MODEL]})",
            "target_ratio": TARGET_RATIO,
            "passed": passed,
            "settings": {
                "torch_threads": torch.get_num_threads(),
                "repeats": repeats,
                "steps_per_block": steps,
                "batch_size": BATCH,
                "input_shape": SHAPE,
                "noise_multiplier": NOISE,
                "max_grad_norm": CLIP,
                "learning_rate": LR,
                "make_private_kwargs": {
                    k: {a: str(b) for a, b in v.items()} for k, v in kwargs.items()
                },
            },
            "verdict": verdict,
            "models": results,
            "environment": {**env, "load_average_end": load_average()},
        },
    )


if __name__ == "__main__":
    main()
