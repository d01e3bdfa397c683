"""Shared fixtures: the small synthetic data set most tests meta-train on."""

import pytest


@pytest.fixture(scope="session")
def synthetic_tasks():
    """``UserTasks`` over ``synthetic(seed=0)``: time-ordered support of 10, users split by time."""
    import metarec

    data = metarec.datasets.synthetic(seed=0)
    return metarec.UserTasks(data, support_size=10, split="time", user_split="time")


@pytest.fixture(scope="module")
def small_maml():
    """(learner, tasks, data): a MAML rating model over 80 items, meta-trained for one epoch.
    Module-scoped: a module may change the learner's settings without touching another's."""
    import keras

    import metarec

    data = metarec.datasets.synthetic(num_users=120, num_items=80, seed=3)
    tasks = metarec.UserTasks(data, support_size=10)
    keras.utils.set_random_seed(0)
    learner = metarec.MAML(metarec.models.rating_mlp(tasks.encoder, embedding_dim=8, hidden_units=(16,)),
                           inner_steps=2, inner_lr=0.05)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3))
    learner.fit(tasks.train, epochs=1, verbose=0)
    return learner, tasks, data


# ---------------------------------------------------------------------------- interaction logs
#: A postgresql:// URL of a server where the tests may create and drop databases; .ci/run
#: starts one and sets it (see .ci/postgres.sh).
POSTGRES_DSN_ENV = "METAREC_TEST_POSTGRES_DSN"


def postgres_admin_url():
    """The URL from the environment, or a skip saying how to get one."""
    import os

    url = os.environ.get(POSTGRES_DSN_ENV)
    if not url:
        pytest.skip(f"PostgreSQL store tests need ${POSTGRES_DSN_ENV} (a postgresql:// URL where tests may "
                    "create databases); `source .ci/postgres.sh` starts a server and sets it")
    pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg: pip install 'metarec[postgres]'")
    return url


def fresh_postgres_database():
    """Create an empty database; yield its URL; drop it afterwards."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    admin = postgres_admin_url()
    name = f"metarec_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def log_location(request, tmp_path):
    """Where an interaction log lives, once per store: a SQLite file path (str), or the URL of a
    fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "log.sqlite")
    else:
        yield from fresh_postgres_database()
