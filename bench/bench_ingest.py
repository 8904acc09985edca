"""DICOM ingest throughput: medfed's reader against bare pydicom, cold and cached.

Targets: ``load_images`` on a cold cache reads at least 0.8x as many files per second as
bare ``pydicom.dcmread(path).pixel_array``; a cached pass is at least 10x faster than
the cold pass.

The tree is synthetic (``generate_imaging_sites``): radiographs (``--xray`` files in
total, 256 x 256, split over 4 sites) and CT series (``--ct-series`` series of 16 slices,
256 x 256), every site in its own transfer syntax as generated (site 0 uncompressed,
1 RLE Lossless, 2 JPEG-LS Lossless, 3 JPEG 2000 Lossless). All in one process, on the
same files, read once before any timing so that every variant finds them in the page
cache, with one untimed warm-up run of each variant; then in each repeat, in a rotating
order:

- ``bare``: ``pydicom.dcmread(path).pixel_array`` for every file (pydicom picks the
  decoder plugin, as a user would get by default);
- ``cold``: ``load_images(root, Preprocess(), cache_dir=<new empty folder>)``, i.e. read,
  hash, parse, decode, Modality LUT, window, resample, group/order, write the cache;
- ``no cache``: ``load_images(root, Preprocess())`` (the same without cache writes);
- ``cached``: ``load_images`` again on a cache filled by an earlier pass (read and hash
  every file, load header records and arrays; no DICOM parsing).

The figure per variant is the median over the repeats; ratios are of medians (the median
of same-repeat ratios is shown too). A second table splits bare, cold and cached by
syntax (one site's radiographs each, timed the same way: interleaved, rotating order,
warm-up first, a new empty cache folder per cold run, deleted untimed). Each repeat also
times creating (and deleting) one empty file per tree file in the work folder: creating
files is the part of a cold pass that depends most on the machine (0.03-1.5 ms per file
on the development container's ext4 within minutes), so it is reported with the ratios.
Results: ``bench/results/bench_ingest.json``.

Usage::

    python bench/bench_ingest.py [--quick] [--repeats N] [--xray N] [--ct-series N] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from _common import default_out, environment, load_average, print_table, write_json

from medfed.client.dicom_data import Preprocess, load_images
from medfed.simulations.synthetic_imaging import SITE_SYNTAXES, generate_imaging_sites

NAME = "bench_ingest"
TARGET_COLD = 0.8  # cold load_images throughput / bare pydicom throughput
TARGET_CACHED = 10.0  # cold pass time / cached pass time
SIZE = 256
SLICES = 16


def build_tree(root: Path, xray: int, ct_series: int, seed: int) -> Path:
    """Synthetic sites, one per syntax, gathered under ``root/tree/<kind>/site-<i>``."""
    sites = len(SITE_SYNTAXES)
    tree = root / "tree"
    parts = [("xray", xray, {}), ("ct", ct_series, {"slices": SLICES})]
    for modality, count, extra in parts:
        if count <= 0:
            continue
        per_site = max(1, round(count / sites))
        made = generate_imaging_sites(
            modality,
            sites,
            root / modality,
            seed=seed,
            image_size=SIZE,
            patients_per_site=per_site,
            **extra,
        )
        for site in made:
            shutil.copytree(site / "dicom", tree / modality / site.name)
    return tree


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def bare(files: list[Path]) -> None:
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is the point


def warm_page_cache(files: list[Path]) -> None:
    """Read every file once, so that no timed variant is the first to touch the disk."""
    for path in files:
        path.read_bytes()


def create_files(folder: Path, count: int) -> None:
    """Create and delete ``count`` empty files in a new folder (the file system's part)."""
    folder.mkdir(parents=True)
    for i in range(count):
        os.close(os.open(folder / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600))
    shutil.rmtree(folder)


def timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def interleaved(
    variants: dict[str, Callable[[int], Any]],
    repeats: int,
    label: str = "",
    after: Callable[[int], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds per variant per repeat: one untimed warm-up run of each (repeat -1), then
    the variants in a rotating order in each repeat (repeat r starts with variant r mod
    n); ``after(r)`` runs untimed after each repeat (deleting the cold caches)."""
    for run in variants.values():
        run(-1)
    if after is not None:
        after(-1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(lambda name=name, r=r: variants[name](r)))
        if after is not None:
            after(r)
        if label:
            line = ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names)
            print(f"  {label}repeat {r + 1}/{repeats}: {line}", flush=True)
    return times


def measure(tree: Path, work: Path, repeats: int, prep: Preprocess) -> dict[str, list[float]]:
    """Seconds per variant per repeat on the whole tree, interleaved."""
    files = files_of(tree)
    warm_page_cache(files)
    warm = work / "warm-cache"
    load_images(tree, prep, warm)  # fills the cache the "cached" variant reads
    variants: dict[str, Callable[[int], Any]] = {
        "bare": lambda r: bare(files),
        "cold": lambda r: load_images(tree, prep, work / f"cold-{r}"),
        "no cache": lambda r: load_images(tree, prep),
        "cached": lambda r: load_images(tree, prep, warm),
        "create files": lambda r: create_files(work / f"create-{r}", len(files)),
    }
    return interleaved(
        variants,
        repeats,
        label="whole tree: ",
        after=lambda r: shutil.rmtree(work / f"cold-{r}", ignore_errors=True),
    )


def per_syntax(tree: Path, work: Path, repeats: int, prep: Preprocess) -> list[dict[str, Any]]:
    """Bare vs cold vs cached on each site's radiographs (one transfer syntax each)."""
    rows = []
    for i, syntax in enumerate(SITE_SYNTAXES):
        site = tree / "xray" / f"site-{i}"
        if not site.is_dir():
            continue
        files = files_of(site)
        warm_page_cache(files)
        warm = work / f"syntax-{i}-warm"
        load_images(site, prep, warm)
        variants: dict[str, Callable[[int], Any]] = {
            "bare": lambda r, files=files: bare(files),
            "cold": lambda r, site=site, i=i: load_images(site, prep, work / f"syntax-{i}-{r}"),
            "cached": lambda r, site=site, warm=warm: load_images(site, prep, warm),
        }
        times = interleaved(
            variants,
            repeats,
            after=lambda r, i=i: shutil.rmtree(work / f"syntax-{i}-{r}", ignore_errors=True),
        )
        shutil.rmtree(warm, ignore_errors=True)
        median = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "syntax": syntax.name,
            "files": len(files),
            "bare_ms_per_file": 1000 * median["bare"] / len(files),
            "cold_ms_per_file": 1000 * median["cold"] / len(files),
            "cached_ms_per_file": 1000 * median["cached"] / len(files),
            "cold_vs_bare_throughput": median["bare"] / median["cold"],
            "cold_vs_bare_paired_median": statistics.median(
                b / c for b, c in zip(times["bare"], times["cold"], strict=True)
            ),
            "cached_speedup_vs_cold": median["cold"] / median["cached"],
            "seconds": times,
        }
        row["passed"] = row["cold_vs_bare_throughput"] >= TARGET_COLD
        rows.append(row)
        print(
            f"  {syntax.name}: cold {row['cold_vs_bare_throughput']:.2f}x bare, "
            f"cached {row['cached_speedup_vs_cold']:.1f}x faster than cold",
            flush=True,
        )
    return rows


def summarise(times: dict[str, list[float]], count: int) -> dict[str, Any]:
    create = times.pop("create files")
    median = {k: statistics.median(v) for k, v in times.items()}
    paired_cold = statistics.median(
        b / c for b, c in zip(times["bare"], times["cold"], strict=True)
    )
    paired_cached = statistics.median(
        c / k for c, k in zip(times["cold"], times["cached"], strict=True)
    )
    return {
        "files": count,
        "median_seconds": median,
        "files_per_second": {k: count / v for k, v in median.items()},
        "seconds": times,
        "cold_vs_bare_throughput": median["bare"] / median["cold"],
        "cold_vs_bare_paired_median": paired_cold,
        "cached_speedup_vs_cold": median["cold"] / median["cached"],
        "cached_speedup_paired_median": paired_cached,
        "no_cache_vs_bare_throughput": median["bare"] / median["no cache"],
        "create_file_ms": 1000 * statistics.median(create) / count,
        "create_file_ms_range": [1000 * min(create) / count, 1000 * max(create) / count],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, a smaller tree")
    parser.add_argument("--out", type=Path, default=default_out(NAME))
    parser.add_argument("--repeats", type=int, default=None, help="repeats (7; quick 3)")
    parser.add_argument("--xray", type=int, default=None, help="radiographs (200; quick 80)")
    parser.add_argument(
        "--ct-series", type=int, default=None, help="CT series of 16 slices (8; quick 4)"
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    xray = args.xray if args.xray is not None else (80 if args.quick else 200)
    ct_series = args.ct_series if args.ct_series is not None else (4 if args.quick else 8)
    env = environment()
    prep = Preprocess()
    with tempfile.TemporaryDirectory(prefix="medfed-bench-ingest-") as tmp:
        root = Path(tmp)
        print(f"generating {xray} radiographs and {ct_series} CT series ...", flush=True)
        tree = build_tree(root, xray, ct_series, args.seed)
        count = len(files_of(tree))
        print(f"{count} files; timing {repeats} repeats ...", flush=True)
        summary = summarise(measure(tree, root / "work", repeats, prep), count)
        syntaxes = per_syntax(tree, root / "work", repeats, prep)

    print_table(
        f"ingest of {count} files ({SIZE} x {SIZE}; Preprocess size {prep.size}, depth "
        f"{prep.depth}), median of {repeats} repeats",
        ["variant", "median s", "files/s", "x bare throughput"],
        [
            [k, v, summary["files_per_second"][k], summary["median_seconds"]["bare"] / v]
            for k, v in summary["median_seconds"].items()
        ],
        digits=3,
    )
    print(
        f"creating one empty file in the work folder: {summary['create_file_ms']:.3f} ms "
        f"(median; {summary['create_file_ms_range'][0]:.3f}-"
        f"{summary['create_file_ms_range'][1]:.3f} over the repeats)"
    )
    print_table(
        "by transfer syntax (one site's radiographs each), medians",
        [
            "syntax",
            "files",
            "bare ms/file",
            "cold ms/file",
            "cached ms/file",
            "cold x bare",
            "paired",
            "cached x faster",
        ],
        [
            [
                r["syntax"],
                r["files"],
                r["bare_ms_per_file"],
                r["cold_ms_per_file"],
                r["cached_ms_per_file"],
                r["cold_vs_bare_throughput"],
                r["cold_vs_bare_paired_median"],
                r["cached_speedup_vs_cold"],
            ]
            for r in syntaxes
        ],
        digits=2,
    )
    passed_cold = summary["cold_vs_bare_throughput"] >= TARGET_COLD
    passed_cached = summary["cached_speedup_vs_cold"] >= TARGET_CACHED
    passed_syntaxes = all(r["passed"] for r in syntaxes)
    slowest = min(syntaxes, key=lambda r: r["cold_vs_bare_throughput"], default=None)
    print_table(
        "verdict",
        ["target", "figure", "paired median", "pass"],
        [
            [
                f"cold >= {TARGET_COLD:g}x bare throughput",
                summary["cold_vs_bare_throughput"],
                summary["cold_vs_bare_paired_median"],
                passed_cold,
            ],
            [
                f"cached >= {TARGET_CACHED:g}x faster than cold",
                summary["cached_speedup_vs_cold"],
                summary["cached_speedup_paired_median"],
                passed_cached,
            ],
            [
                f"cold >= {TARGET_COLD:g}x bare for each syntax (slowest: "
                f"{slowest['syntax'] if slowest else '-'})",
                slowest["cold_vs_bare_throughput"] if slowest else None,
                slowest["cold_vs_bare_paired_median"] if slowest else None,
                passed_syntaxes,
            ],
        ],
        digits=2,
    )
    write_json(
        args.out,
        {
            "benchmark": NAME,
            "target": (
                f"cold >= {TARGET_COLD:g}x bare pydicom, on the mixed tree and for each "
                f"syntax; cached >= {TARGET_CACHED:g}x cold"
            ),
            "passed": passed_cold and passed_cached and passed_syntaxes,
            "passed_cold": passed_cold,
            "passed_cached": passed_cached,
            "passed_by_syntax": passed_syntaxes,
            "settings": {
                "repeats": repeats,
                "xray_files": xray,
                "ct_series": ct_series,
                "slices": SLICES,
                "image_size": SIZE,
                "preprocess": prep.key(),
                "syntaxes": [s.name for s in SITE_SYNTAXES],
            },
            "summary": summary,
            "by_syntax": syntaxes,
            "environment": {**env, "load_average_end": load_average()},
        },
    )


if __name__ == "__main__":
    main()
