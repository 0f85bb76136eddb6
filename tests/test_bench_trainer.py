"""bench/trainer.py: the subsets it trains on and the table it reports (the runs themselves are benchmarks)."""
from __future__ import annotations

import numpy as np

from bench import trainer


def test_balanced_rows_take_the_share_of_every_class_by_seed():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    rows = trainer.balanced_rows(labels, 0.1, seed=4)
    assert np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows]).tolist() == [1, 2, 3]
    assert np.array_equal(rows, trainer.balanced_rows(labels, 0.1, seed=4))
    assert not np.array_equal(rows, trainer.balanced_rows(labels, 0.1, seed=5))
    assert np.array_equal(trainer.balanced_rows(labels, 1.0, seed=0), np.arange(60))


def test_the_table_groups_seeds_and_orders_variants_as_declared():
    records = [{"variant": v, "share": 1.0, "steps": 100, "seed": s, "top1": t, "seconds": 10.0}
               for v, s, t in (("no-tta", 0, 0.5), ("default", 0, 0.8), ("default", 1, 0.9))]
    lines = trainer.table(records).splitlines()
    assert lines[2] == "| default | 1 | 100 | 2 | 0.8500 | 7.07 | 10 |"
    assert lines[3].startswith("| no-tta | 1 | 100 | 1 | 0.5000 | nan |")
