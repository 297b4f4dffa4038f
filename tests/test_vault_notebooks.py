"""The inventory and custody re-split runbooks pass headless, twice on one lab."""

from __future__ import annotations

from pathlib import Path

from trekeys.drills import run_drills
from trekeys.lab import Lab


def test_inventory_and_resplit_drills_pass_twice(full_lab: Lab, tmp_path: Path) -> None:
    splits = []
    for _ in range(2):
        run = run_drills(
            full_lab.root, tmp_path / "reports", names=["inventory", "custody-resplit"]
        )

        assert [d.outcome for d in run.drills] == ["passed", "passed"], [
            d.error for d in run.drills
        ]
        assert len(list(run.folder.glob("inventory-*.csv"))) == 1
        assert len(list(run.folder.glob("inventory-*.json"))) == 1
        with full_lab.open_vault(read_only=True) as vault:
            splits.append(vault.meta["custody"]["split"])

    assert splits[0] != splits[1]
