"""MovieLens loaders (100K, 1M, latest-small) returning :class:`InteractionData`.

The files are read from a folder the caller gives; nothing is bundled (the 100K and 1M
licences forbid redistribution). :func:`download_movielens` fetches an official archive
into a local cache, but only when called explicitly.

Features produced: users ``age`` (numeric), ``gender``, ``occupation``, ``zip_prefix``
(categorical; first character of the zip code); items ``genres`` (multi-hot) and ``year``
(numeric release year, from the release date or the title). latest-small has no user
features.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from metarec.interactions import InteractionData
from metarec.schema import infer_schema

VARIANTS = ("100k", "1m", "latest-small")
BASE_URL = "https://files.grouplens.org/datasets/movielens/"
#: The file that proves a folder holds each variant (any one of the alternatives).
MARKER_FILES = {
    "100k": ("u.data",),
    "1m": ("ratings.dat", "ratings_notime.dat"),
    "latest-small": ("ratings.csv",),
}
REQUIRED_FILES = {
    "100k": ("u.data", "u.user", "u.item"),
    "1m": ("users.dat", "movies.dat"),
    "latest-small": ("ratings.csv", "movies.csv"),
}
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# ML-1M's users.dat codes occupations 0..20; names from its README, aligned with ML-100K's.
OCCUPATIONS_1M = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)
_TITLE_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")


def normalise_variant(variant: str) -> str:
    """``"ml-100k"``, ``"100K"`` … → one of :data:`VARIANTS`."""
    key = str(variant).lower().strip()
    key = key[3:] if key.startswith("ml-") else key
    if key not in VARIANTS:
        raise ValueError(f"unknown MovieLens variant {variant!r}; expected one of {VARIANTS}")
    return key


def detect_variant(path: str | os.PathLike) -> str:
    """Which MovieLens variant the folder ``path`` holds (by its file names)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"MovieLens folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"MovieLens path {str(folder)!r} is a file, expected a folder")
    for variant, markers in MARKER_FILES.items():
        if any((folder / m).is_file() for m in markers):
            return variant
    raise ValueError(
        f"{str(folder)!r} is not a MovieLens folder: expected u.data (100K), ratings.dat or "
        f"ratings_notime.dat (1M) or ratings.csv (latest-small); found "
        f"{sorted(p.name for p in folder.iterdir())[:10]}"
    )


def load_movielens(path: str | os.PathLike, variant: str | None = None,
                   feedback: str = "explicit") -> InteractionData:
    """Load a MovieLens folder as :class:`InteractionData`.

    Args:
        path: the extracted folder (``ml-100k/``, ``ml-1m/`` or ``ml-latest-small/``); a
            parent holding exactly one ``ml-*`` folder of the requested variant also works.
        variant: ``"100k"``, ``"1m"`` or ``"latest-small"``; detected from the files when
            ``None``.
        feedback: ``"explicit"`` (the ratings) or ``"implicit"``: every rating becomes an
            interaction with label 1 and the rating values are dropped (protocol Q2-implicit);
            train such data with a catalogue objective (``metarec.catalogue_objective``).

    ML-1M without ``ratings.dat`` (only ``ratings_notime.dat``) has no ``timestamp``
    column: use random splits on it.
    """
    folder = Path(path).expanduser()
    if variant is not None:
        variant = normalise_variant(variant)
        nested = folder / f"ml-{variant}"
        if not any((folder / m).is_file() for m in MARKER_FILES[variant]) and nested.is_dir():
            folder = nested  # the caller pointed at the cache / parent folder
        found = detect_variant(folder)
        if found != variant:
            raise ValueError(f"{str(folder)!r} holds MovieLens {found}, not the requested {variant}")
    else:
        variant = detect_variant(folder)
    if feedback not in ("explicit", "implicit"):
        raise ValueError(f"feedback must be 'explicit' or 'implicit'; got feedback={feedback!r}.")
    missing = [f for f in REQUIRED_FILES[variant] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"MovieLens {variant} folder {str(folder)!r} lacks {missing}")
    loader = {"100k": _load_100k, "1m": _load_1m, "latest-small": _load_latest_small}[variant]
    interactions, users, items, rating_range = loader(folder)
    if feedback == "implicit":
        interactions = interactions.assign(rating=1.0)
        rating_range = None
    schema = infer_schema(interactions, users, items, feedback=feedback, rating_range=rating_range)
    return InteractionData(interactions, users, items, schema=schema)


# ---------------------------------------------------------------------------- parsers
def _year_from_title(titles: pd.Series) -> pd.Series:
    return pd.to_numeric(titles.str.extract(_TITLE_YEAR, expand=False), errors="coerce")


def _split_genres(genres: pd.Series) -> list[list[str]]:
    # latest-small writes "(no genres listed)" for movies without genres.
    return [[g for g in str(cell).split("|") if g and g != "(no genres listed)"]
            if isinstance(cell, str) else [] for cell in genres]


def _read_double_colon(file: Path, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    # "::" needs pandas' slow python engine; a one-character separator keeps the C parser.
    text = file.read_text(encoding=encoding).replace("::", "\t")
    return pd.read_csv(io.StringIO(text), sep="\t", header=None, names=names,
                       quoting=3, dtype=str, keep_default_na=False)


def _load_100k(folder: Path):
    interactions = pd.read_csv(folder / "u.data", sep="\t", header=None,
                               names=["user_id", "item_id", "rating", "timestamp"])
    users = pd.read_csv(folder / "u.user", sep="|", header=None,
                        names=["user_id", "age", "gender", "occupation", "zip"],
                        dtype={"zip": str, "gender": str, "occupation": str})
    users["zip_prefix"] = users.pop("zip").str[:1]
    genre_names = list(GENRES_100K)
    genre_file = folder / "u.genre"
    if genre_file.is_file():
        table = pd.read_csv(genre_file, sep="|", header=None, names=["name", "index"],
                            encoding="latin-1").dropna()
        genre_names = table.sort_values("index")["name"].tolist()
    columns = ["item_id", "title", "release_date", "video_release_date", "url"] + genre_names
    raw = pd.read_csv(folder / "u.item", sep="|", header=None, names=columns, encoding="latin-1",
                      dtype={"title": str, "release_date": str})
    flags = raw[genre_names].to_numpy(dtype=bool)
    year = pd.to_numeric(raw["release_date"].str[-4:], errors="coerce")
    year = year.fillna(_year_from_title(raw["title"].fillna("")))
    items = pd.DataFrame({
        "item_id": raw["item_id"],
        "genres": [[genre_names[j] for j in np.flatnonzero(row)] for row in flags],
        "year": year.astype(np.float64),
    })
    return interactions, users.set_index("user_id"), items.set_index("item_id"), (1.0, 5.0)


def _load_1m(folder: Path):
    if (folder / "ratings.dat").is_file():
        ratings = _read_double_colon(folder / "ratings.dat", ["user_id", "item_id", "rating", "timestamp"])
    else:
        ratings = _read_double_colon(folder / "ratings_notime.dat", ["user_id", "item_id", "rating"])
    interactions = ratings.apply(pd.to_numeric)
    users = _read_double_colon(folder / "users.dat", ["user_id", "gender", "age", "occupation", "zip"])
    codes = users["occupation"].astype(int)
    users = pd.DataFrame({
        "user_id": users["user_id"].astype(np.int64),
        "age": users["age"].astype(np.int64),  # the published age bucket (1, 18, 25, ...)
        "gender": users["gender"],
        "occupation": [OCCUPATIONS_1M[c] if 0 <= c < len(OCCUPATIONS_1M) else str(c) for c in codes],
        "zip_prefix": users["zip"].str[:1],
    })
    movies = _read_double_colon(folder / "movies.dat", ["item_id", "title", "genres"])
    items = pd.DataFrame({
        "item_id": movies["item_id"].astype(np.int64),
        "genres": _split_genres(movies["genres"]),
        "year": _year_from_title(movies["title"]).astype(np.float64),
    })
    return interactions, users.set_index("user_id"), items.set_index("item_id"), (1.0, 5.0)


def _load_latest_small(folder: Path):
    ratings = pd.read_csv(folder / "ratings.csv")
    interactions = ratings.rename(columns={"userId": "user_id", "movieId": "item_id"})
    movies = pd.read_csv(folder / "movies.csv", dtype={"title": str, "genres": str})
    items = pd.DataFrame({
        "item_id": movies["movieId"].astype(np.int64),
        "genres": _split_genres(movies["genres"]),
        "year": _year_from_title(movies["title"].fillna("")).astype(np.float64),
    })
    return interactions, None, items.set_index("item_id"), (0.5, 5.0)


# ---------------------------------------------------------------------------- download
def download_movielens(
    variant: str,
    cache_dir: str | os.PathLike = "~/.cache/metarec",
    force: bool = False,
    sha256: str | None = None,
) -> Path:
    """Download and extract an official MovieLens archive; return the extracted folder.

    Opt-in: nothing in metarec calls this implicitly. An already extracted folder (or an
    already downloaded zip) in ``cache_dir`` is reused unless ``force``. The zip is checked
    before extraction: it must be a readable archive with intact CRCs, contain the variant's
    ratings file, have no member escaping the cache folder, and match ``sha256`` if given.
    Read the data set's licence (its README) before use.
    """
    variant = normalise_variant(variant)
    cache = Path(cache_dir).expanduser()
    folder = cache / f"ml-{variant}"
    if not force and folder.is_dir() and _is_complete(folder, variant):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"ml-{variant}.zip"
    if force or not archive.is_file():
        _fetch(f"{BASE_URL}ml-{variant}.zip", archive)
    extract_archive(archive, cache, variant, sha256=sha256)
    if not _is_complete(folder, variant):
        raise ValueError(f"archive {str(archive)!r} did not produce a complete {str(folder)!r}")
    return folder


def _is_complete(folder: Path, variant: str) -> bool:
    has_marker = any((folder / m).is_file() for m in MARKER_FILES[variant])
    return has_marker and all((folder / f).is_file() for f in REQUIRED_FILES[variant])


def _fetch(url: str, destination: Path) -> None:
    # Download to a temporary file in the same folder so a broken transfer never leaves a
    # half-written archive under the final name.
    handle, tmp = tempfile.mkstemp(dir=destination.parent, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, destination)
    except OSError as exc:
        raise OSError(f"could not download {url}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def extract_archive(archive: Path, cache: Path, variant: str, sha256: str | None = None) -> None:
    """Verify a MovieLens zip (see :func:`download_movielens`) and extract it into ``cache``."""
    archive = Path(archive)
    if sha256 is not None:
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != sha256.lower():
            raise ValueError(f"{str(archive)!r} has SHA-256 {digest}, expected {sha256}")
    if not zipfile.is_zipfile(archive):
        raise ValueError(f"{str(archive)!r} is not a zip archive (delete it and download again)")
    with zipfile.ZipFile(archive) as zf:
        broken = zf.testzip()
        if broken is not None:
            raise ValueError(f"{str(archive)!r} is corrupt: member {broken!r} fails its CRC check")
        names = zf.namelist()
        root = cache.resolve()
        for name in names:
            target = (cache / name).resolve()
            if root != target and root not in target.parents:
                raise ValueError(f"{str(archive)!r} member {name!r} would extract outside {str(cache)!r}")
        expected = [f"ml-{variant}/{m}" for m in MARKER_FILES[variant]]
        if not any(e in names for e in expected):
            raise ValueError(f"{str(archive)!r} lacks {expected[0]!r}; is it the {variant} archive?")
        zf.extractall(cache)
