"""MovieLens loaders (on ../shared/data when present), download logic offline, synthetic data."""

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec.datasets import detect_variant, download_movielens, load_movielens, synthetic
from metarec.datasets.movielens import extract_archive
from metarec.encoding import FeatureEncoder
from metarec.tasks import UserTasks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _folder(name: str) -> Path:
    folder = DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is not available")
    return folder


# --------------------------------------------------------------------------- real MovieLens
def test_ml100k_loader_and_features():
    data = load_movielens(_folder("ml-100k"))
    assert len(data) == 100_000 and data.num_users == 943 and data.num_items == 1682
    assert data.feedback == "explicit" and data.schema.rating_range == (1.0, 5.0)
    kinds = {s.name: s.kind for s in data.schema.features}
    assert kinds == {"age": "numeric", "gender": "categorical", "occupation": "categorical",
                     "zip_prefix": "categorical", "genres": "multi_hot", "year": "numeric"}
    assert data.users.loc[1].tolist() == [24, "M", "technician", "8"]
    assert data.items.loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert data.items.loc[1, "year"] == 1995
    assert data.has_timestamps
    enc = FeatureEncoder.fit(data)
    assert enc.feature_specs["genres"].dim == 20  # 19 genres + the unknown column
    assert "T" in enc.feature_specs["zip_prefix"].vocabulary  # Canadian zip codes survive


def test_ml100k_q1_split_gives_130_test_users_fast():
    data = load_movielens(_folder("ml-100k"))
    start = time.perf_counter()
    tasks = UserTasks(data, support_size=10, eval_min_interactions=30)
    assert time.perf_counter() - start < 1.0
    assert (len(tasks.train), len(tasks.test)) == (660, 130)
    # Recompute the Q1 split independently: order users by first rating, ties by user id.
    first = data.interactions.groupby("user_id").timestamp.min().reset_index()
    order = first.sort_values(["timestamp", "user_id"]).user_id.to_numpy()
    counts = data.interactions.user_id.value_counts()
    expected_test = [u for u in order[660 + 94:] if counts[u] >= 30]
    assert tasks.test.user_ids.tolist() == expected_test
    assert tasks.train.user_ids.tolist() == order[:660].tolist()
    held_out = set(tasks.val.user_ids) | set(tasks.test.user_ids)
    assert not held_out & set(tasks.train.frame().user_id)
    assert tasks.test.support_frame(0).timestamp.is_monotonic_increasing


def test_ml1m_without_timestamps():
    data = load_movielens(_folder("ml-1m"))
    assert len(data) == 1_000_209 and data.num_users == 6040 and data.num_items == 3706
    assert not data.has_timestamps
    assert data.users.loc[1].tolist() == [1, "F", "K-12 student", "4"]
    assert data.items.loc[1, "genres"] == ["Animation", "Children's", "Comedy"]
    assert data.items.loc[1, "year"] == 1995
    with pytest.raises(ValueError, match="timestamp"):
        UserTasks(data)
    tasks = UserTasks(data, split="random", user_split="random")
    assert len(tasks.train) + len(tasks.val) + len(tasks.test) == 6040


def test_ml_latest_small():
    data = load_movielens(_folder("ml-latest-small"), variant="latest-small")
    assert len(data) == 100_836 and data.num_users == 610
    assert data.users is None and data.schema.user_features == ()
    assert data.schema.rating_range == (0.5, 5.0)
    assert data.items.loc[1, "genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert data.items.loc[1, "year"] == 1995
    assert (data.items.genres.map(len) == 0).sum() > 0  # "(no genres listed)" → no genres
    assert set(np.unique(data.interactions.rating * 2)) <= set(range(1, 11))


def test_variant_mismatch_and_parent_folder():
    folder = _folder("ml-100k")
    with pytest.raises(ValueError, match="holds MovieLens 100k, not the requested 1m"):
        load_movielens(folder, variant="1m")
    assert detect_variant(folder) == "100k"
    assert load_movielens(folder.parent, variant="ml-100k").num_users == 943


# --------------------------------------------------------------------------- error paths
def test_missing_and_wrong_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_movielens(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not a MovieLens folder.*notes.txt"):
        load_movielens(tmp_path)
    with pytest.raises(NotADirectoryError):
        load_movielens(tmp_path / "notes.txt")
    (tmp_path / "u.data").write_text("1\t1\t5\t1\n")
    with pytest.raises(FileNotFoundError, match=r"lacks \['u.user', 'u.item'\]"):
        load_movielens(tmp_path)
    with pytest.raises(ValueError, match="'10m'"):
        load_movielens(tmp_path, variant="10m")


def _tiny_100k_zip(path: Path, corrupt: bool = False, escape: bool = False) -> None:
    """A made-up archive with the ML-100K layout (a few invented rows, not real data)."""
    item_row = "1|Film (1999)|01-Jan-1999||http://x|" + "|".join(["0"] * 18 + ["1"])
    files = {
        "ml-100k/u.data": "1\t1\t4\t100\n2\t1\t3\t200\n",
        "ml-100k/u.user": "1|30|F|writer|12345\n2|40|M|artist|T8H1N\n",
        "ml-100k/u.item": item_row + "\n",
    }
    if escape:
        files["../evil.txt"] = "x"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    raw = bytearray(buffer.getvalue())
    if corrupt:
        raw[raw.index(b"1\t1\t4")] ^= 0xFF  # flip a data byte: the CRC check must fail
    path.write_bytes(bytes(raw))


def test_download_uses_cached_zip_without_network(tmp_path):
    _tiny_100k_zip(tmp_path / "ml-100k.zip")
    folder = download_movielens("ml-100k", cache_dir=tmp_path)
    assert folder == tmp_path / "ml-100k" and (folder / "u.data").is_file()
    data = load_movielens(folder)
    assert data.num_users == 2 and data.items.loc[1, "genres"] == ["Western"]
    assert data.users.loc[2, "zip_prefix"] == "T"
    # Once extracted, the folder is reused even without the zip.
    (tmp_path / "ml-100k.zip").unlink()
    assert download_movielens("100k", cache_dir=tmp_path) == folder


def test_archive_verification(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a zip archive"):
        extract_archive(bad, tmp_path, "100k")
    _tiny_100k_zip(bad, corrupt=True)
    with pytest.raises(ValueError, match="CRC"):
        extract_archive(bad, tmp_path, "100k")
    _tiny_100k_zip(bad, escape=True)
    with pytest.raises(ValueError, match="outside"):
        extract_archive(bad, tmp_path / "cache", "100k")
    _tiny_100k_zip(bad)
    with pytest.raises(ValueError, match="ml-1m/ratings.dat"):
        extract_archive(bad, tmp_path, "1m")
    with pytest.raises(ValueError, match="SHA-256"):
        extract_archive(bad, tmp_path, "100k", sha256="0" * 64)
    with pytest.raises(ValueError, match="'20m'"):
        download_movielens("20m", cache_dir=tmp_path)


# --------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_well_formed():
    a = synthetic(num_users=80, num_items=50, seed=3)
    b = synthetic(num_users=80, num_items=50, seed=3)
    c = synthetic(num_users=80, num_items=50, seed=4)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert not a.interactions.equals(c.interactions)
    counts = a.interactions.user_id.value_counts()
    assert counts.min() >= 20 and counts.max() <= 50  # capped at num_items
    assert set(a.interactions.rating.unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert a.interactions.rating.nunique() == 5
    kinds = {s.name: s.kind for s in a.schema.features}
    assert kinds == {"segment": "categorical", "age": "numeric", "genres": "multi_hot",
                     "year": "numeric", "popularity": "numeric"}
    first = a.interactions.groupby("user_id").timestamp.min()
    assert first.is_monotonic_increasing  # later user ids arrive later
    per_user_sorted = a.interactions.groupby("user_id").timestamp.apply(lambda t: t.is_monotonic_increasing)
    assert per_user_sorted.all()


def test_synthetic_users_have_taste_beyond_features():
    """Within one segment, users' mean ratings of the same items still differ a lot."""
    data = synthetic(num_users=400, num_items=60, interactions_per_user=(50, 60), seed=0, noise=0.1)
    frame = data.interactions.merge(data.users, left_on="user_id", right_index=True)
    segment = frame[frame.segment == "segment_0"]
    table = segment.pivot_table(index="user_id", columns="item_id", values="rating")
    centred = table - table.mean(axis=0)  # remove what the items (and the segment) explain
    per_user = centred.mean(axis=1)
    assert per_user.std() > 0.3  # hidden bias / taste: only the user's own ratings reveal it


def test_synthetic_implicit():
    data = synthetic(num_users=30, num_items=40, feedback="implicit", seed=2)
    assert data.feedback == "implicit"
    assert set(data.interactions.rating.unique()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="'ordinal'"):
        synthetic(feedback="ordinal")
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        synthetic(interactions_per_user=(5, 2))


def test_ml1m_official_layout_with_timestamps(tmp_path):
    """The published ML-1M archive's ``ratings.dat`` (with timestamps), from made-up rows: a
    latin-1 title, a genre list, an unknown occupation code."""
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::99::T8H1N\n")
    (folder / "movies.dat").write_bytes("10::Am\xe9lie (2001)::Comedy|Romance\n20::Heat (1995)::Action\n"
                                        .encode("latin-1"))
    data = load_movielens(folder)
    assert detect_variant(folder) == "1m"
    assert data.has_timestamps and len(data) == 3 and data.num_users == 2 and data.num_items == 2
    assert data.interactions.timestamp.tolist() == [978300760, 978302109, 978301968]
    assert data.users.loc[1].tolist() == [1, "F", "K-12 student", "4"]
    assert data.users.loc[2, "occupation"] == "99"  # a code outside the published list is kept
    assert data.items.loc[10, "genres"] == ["Comedy", "Romance"]
    assert data.items.loc[10, "year"] == 2001
    # With timestamps the time-ordered split of protocol Q1 works.
    tasks = UserTasks(data, support_size=1, split="time", user_split="time", fractions=(1.0, 0.0, 0.0))
    assert tasks.train.support_frame(0).item_id.tolist() == [10]
