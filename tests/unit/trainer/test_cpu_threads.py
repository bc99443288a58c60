"""trainer/distributed/launcher.cpu_threads: a user's OMP_NUM_THREADS is honoured; otherwise the cores are shared."""

from trainer.distributed.launcher import cpu_threads


def test_omp_num_threads_wins_whatever_the_core_count():
    for cores in (2, 16, 96):
        assert cpu_threads({"OMP_NUM_THREADS": "1"}, cores, 2) == 1
        assert cpu_threads({"OMP_NUM_THREADS": "3"}, cores, 8) == 3


def test_without_it_the_node_cores_are_shared_among_its_ranks():
    assert cpu_threads({}, 16, 2) == 8
    assert cpu_threads({}, 2, 2) == 1
    assert cpu_threads({}, 2, 4) == 1  # never zero
    assert cpu_threads({"OMP_NUM_THREADS": ""}, 16, 4) == 4  # empty or garbage: as if unset
    assert cpu_threads({"OMP_NUM_THREADS": "0"}, 16, 4) == 4
