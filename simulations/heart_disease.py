"""The four real UCI Heart Disease hospitals as four medfed sites.

The shipped files (``data/uci-heart-disease/*.csv`` inside this package) are copied
byte for byte, one hospital per site directory. Nothing is imputed, filtered or pooled
here: each site handles its own missing values later, with public defaults from
:data:`medfed.common.tasks.HEART_DISEASE_RISK`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.common.atomic import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11; only needed for typing
    from importlib.resources.abc import Traversable

CSV_NAME = "clinical.csv"
SOURCE_NAME = "SOURCE.txt"

#: The four hospitals, in site order (``site-0`` is Cleveland, ..., ``site-3`` is V.A.).
HOSPITALS: tuple[str, ...] = ("cleveland", "hungarian", "switzerland", "va")

#: Institution behind each hospital's file.
INSTITUTIONS: dict[str, str] = {
    "cleveland": "Cleveland Clinic Foundation, Cleveland, Ohio",
    "hungarian": "Hungarian Institute of Cardiology, Budapest",
    "switzerland": "University Hospitals of Zurich and Basel",
    "va": "V.A. Medical Center, Long Beach, California",
}

#: Records (data rows, without the header) in each shipped file.
RECORD_COUNTS: dict[str, int] = {
    "cleveland": 303,
    "hungarian": 294,
    "switzerland": 123,
    "va": 200,
}

#: Citation and licence of the data set; cite it wherever the data are used.
ATTRIBUTION: str = (
    "Heart Disease data set, UCI Machine Learning Repository, by Andras Janosi "
    "(Hungarian Institute of Cardiology, Budapest), William Steinbrunn (University "
    "Hospital, Zurich), Matthias Pfisterer (University Hospital, Basel) and Robert "
    "Detrano (V.A. Medical Center, Long Beach, and Cleveland Clinic Foundation), 1988; "
    "doi:10.24432/C52P4X. Licensed under Creative Commons Attribution 4.0 "
    "International (CC BY 4.0, https://creativecommons.org/licenses/by/4.0/). Values "
    "are as in the processed UCI files; only the header and the missing-value marker "
    "were normalised (a '?' became an empty cell)."
)


def _check_hospital(hospital: str) -> None:
    if hospital not in HOSPITALS:
        raise ValueError(f"unknown hospital {hospital!r} (known: {', '.join(HOSPITALS)})")


def _shipped(hospital: str) -> Traversable:
    _check_hospital(hospital)
    resource = files("medfed.simulations") / "data" / "uci-heart-disease"
    resource = resource / f"{hospital}.csv"
    if not resource.is_file():
        raise FileNotFoundError(
            f"shipped UCI Heart Disease file for {hospital!r} not found at {resource}; "
            "is the medfed package installed with its data files?"
        )
    return resource


def shipped_file(hospital: str) -> Path:
    """Path of the CSV that ships with medfed for ``hospital``.

    Raises
    ------
    ValueError
        If ``hospital`` is not one of :data:`HOSPITALS`.
    FileNotFoundError
        If the package was installed without its data files.
    """
    return Path(str(_shipped(hospital)))


def _source_text(index: int, hospital: str) -> str:
    return (
        f"site-{index}: {INSTITUTIONS[hospital]}\n"
        f"file: {hospital}.csv ({RECORD_COUNTS[hospital]} records), copied unchanged "
        "from medfed's shipped copy\n"
        "\n"
        f"{ATTRIBUTION}\n"
    )


def prepare_heart_disease_sites(out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write one site per hospital: ``out_dir/site-<i>/clinical.csv`` and SOURCE.txt.

    ``site-<i>`` holds hospital ``HOSPITALS[i]``: its shipped CSV copied byte for byte
    and a ``SOURCE.txt`` naming the institution and the data set's attribution.
    Returns the site directories in :data:`HOSPITALS` order.

    Raises
    ------
    FileExistsError
        If a target file already exists and ``overwrite`` is false; nothing is written.
    """
    out_dir = Path(out_dir)
    site_dirs = [out_dir / f"site-{i}" for i in range(len(HOSPITALS))]
    if not overwrite:
        existing = [
            str(path)
            for site_dir in site_dirs
            for path in (site_dir / CSV_NAME, site_dir / SOURCE_NAME)
            if path.exists()
        ]
        if existing:
            raise FileExistsError(
                "refusing to overwrite existing heart-disease site data: "
                + ", ".join(existing)
                + " (pass overwrite=True to replace it)"
            )
    sources = [_shipped(hospital).read_bytes() for hospital in HOSPITALS]
    for i, (hospital, data, site_dir) in enumerate(zip(HOSPITALS, sources, site_dirs, strict=True)):
        atomic_write_bytes(site_dir / CSV_NAME, data)
        atomic_write_text(site_dir / SOURCE_NAME, _source_text(i, hospital))
    return site_dirs
