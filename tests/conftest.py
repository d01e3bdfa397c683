"""Shared fixtures: the small synthetic data set most tests meta-train on."""

import pytest


@pytest.fixture(scope="session")
def synthetic_tasks():
    """``UserTasks`` over ``synthetic(seed=0)``: time-ordered support of 10, users split by time."""
    import metarec

    data = metarec.datasets.synthetic(seed=0)
    return metarec.UserTasks(data, support_size=10, split="time", user_split="time")
