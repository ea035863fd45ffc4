"""How the launcher places stage actors on GPUs (Ray hides GPUs from actors that ask for none)."""

import pytest

from workers.launcher import gpu_share


@pytest.mark.parametrize(("gpus", "actors"), [(1, 3), (1, 4), (2, 3), (8, 3), (3, 7)])
def test_every_actor_gets_a_share_that_fits(gpus, actors):
    share = gpu_share(gpus, actors)
    assert 0 < share <= 1
    assert share * actors <= gpus + 1e-9
    assert share == 1 or share * actors > gpus - actors * 1e-4  # nothing left idle beyond rounding


def test_no_gpus_means_cpu_actors():
    assert gpu_share(0, 3) == 0
