"""The inventory: rows, cryptoperiod flags, filters, exports and the strength rule."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest

from trekeys.errors import DestinationExistsError
from trekeys.inventory import (
    build_inventory,
    export_inventory,
    to_csv,
    to_json,
    to_table,
    vault_strength_check,
)
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.vault import Vault, VaultCredentials

NOW = utcnow()


def _record(key_id: str, age_days: int, **values) -> KeyRecord:
    created = NOW - timedelta(days=age_days)
    values.setdefault("kind", KeyKind.LUKS_VOLUME)
    values.setdefault("owner", "instance:alpha")
    return KeyRecord(
        id=key_id,
        purpose="test key",
        created=created,
        activated=created,
        state=values.pop("state", KeyState.ACTIVE),
        **values,
    )


@pytest.fixture
def stocked_vault(vault_path: Path, credentials: VaultCredentials) -> Vault:
    with Vault.open(vault_path, credentials) as vault:
        vault.add(
            _record(
                "alpha/old",
                400,
                cryptoperiod_days=365,
                strength_bits=256,
                protects=["volume:alpha"],
                locations=["vault", "backup-media/alpha-header.img"],
            ),
            b"k" * 64,
        )
        vault.add(_record("alpha/soon", 350, cryptoperiod_days=365), b"k" * 64)
        vault.add(_record("alpha/fresh", 10, cryptoperiod_days=365), b"k" * 64)
        vault.add(
            _record(
                "tls/portal",
                100,
                kind=KeyKind.TLS_CERT,
                owner="tre",
                expires=NOW + timedelta(days=5),
                protects=["service:portal.tre.internal"],
            ),
            "pem",
        )
        vault.add(
            _record(
                "beta/gone",
                900,
                owner="instance:beta",
                cryptoperiod_days=30,
                state=KeyState.DEACTIVATED,
            ),
            b"k" * 64,
        )
        vault.destroy("beta/gone", "retired")
    return Vault.open(vault_path, credentials, read_only=True)


def _rows_by_id(vault: Vault, **filters) -> dict:
    return {row.id: row for row in build_inventory(vault, now=NOW, **filters)}


def test_inventory_row_values(stocked_vault: Vault) -> None:
    row = _rows_by_id(stocked_vault)["alpha/old"]

    assert row.kind == "luks-volume"
    assert row.owner == "instance:alpha"
    assert row.state == "active"
    assert row.age_days == 400
    assert row.days_left == -35
    assert row.expires == (NOW - timedelta(days=35)).date().isoformat()
    assert row.protects == "volume:alpha"
    assert row.locations == "vault, backup-media/alpha-header.img"
    assert row.flags == ["cryptoperiod-ended"]


def test_cryptoperiod_flags(stocked_vault: Vault) -> None:
    rows = _rows_by_id(stocked_vault)

    assert rows["alpha/soon"].flags == ["cryptoperiod-ending"]
    assert rows["alpha/soon"].days_left == 15
    assert rows["alpha/fresh"].flags == []
    assert rows["tls/portal"].flags == ["cryptoperiod-ending"]
    assert rows["tls/portal"].days_left in (4, 5)
    assert rows["beta/gone"].flags == []
    assert rows["beta/gone"].state == "destroyed"


def test_inventory_filters(stocked_vault: Vault) -> None:
    assert list(_rows_by_id(stocked_vault, kind="tls-cert")) == ["tls/portal"]
    assert list(_rows_by_id(stocked_vault, owner="instance:beta")) == ["beta/gone"]
    assert sorted(_rows_by_id(stocked_vault, state="active")) == [
        "alpha/fresh",
        "alpha/old",
        "alpha/soon",
        "tls/portal",
    ]


def test_csv_export_values(stocked_vault: Vault) -> None:
    text = to_csv(build_inventory(stocked_vault, now=NOW))

    rows = {row["id"]: row for row in csv.DictReader(io.StringIO(text))}
    assert len(rows) == 5
    assert rows["alpha/old"]["flags"] == "cryptoperiod-ended"
    assert rows["alpha/old"]["age_days"] == "400"
    assert rows["alpha/old"]["locations"] == "vault, backup-media/alpha-header.img"
    assert rows["tls/portal"]["protects"] == "service:portal.tre.internal"
    assert rows["beta/gone"]["state"] == "destroyed"


def test_json_export_values(stocked_vault: Vault) -> None:
    data = json.loads(to_json(build_inventory(stocked_vault, now=NOW)))

    rows = {row["id"]: row for row in data}
    assert rows["alpha/old"]["flags"] == ["cryptoperiod-ended"]
    assert rows["alpha/old"]["days_left"] == -35
    assert rows["alpha/old"]["strength_bits"] == 256
    assert rows["alpha/soon"]["flags"] == ["cryptoperiod-ending"]


def test_table_lists_every_key(stocked_vault: Vault) -> None:
    text = to_table(build_inventory(stocked_vault, now=NOW))

    lines = text.splitlines()
    assert lines[0].startswith("id")
    assert len(lines) == 6
    assert any("alpha/old" in line and "cryptoperiod-ended" in line for line in lines)


def test_strength_rule_holds(stocked_vault: Vault) -> None:
    holds, message = vault_strength_check(stocked_vault)

    assert holds
    assert "strongest key held 256 bits: meets the policy" in message


def test_strength_rule_violated_by_stronger_key(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    with Vault.open(vault_path, credentials) as vault:
        vault.add(_record("alpha/huge", 1, strength_bits=384), b"k" * 96)

        holds, message = vault_strength_check(vault)

    assert not holds
    assert "strongest key held 384 bits: VIOLATES the policy" in message


def test_export_writes_both_formats_once(stocked_vault: Vault, tmp_path: Path) -> None:
    rows = build_inventory(stocked_vault, now=NOW)

    written = export_inventory(rows, tmp_path / "reports", now=NOW)

    assert json.loads(written["json"].read_text())[0]["id"] == rows[0].id
    assert written["csv"].read_text().splitlines()[0].startswith("id,kind,owner")
    for path in written.values():
        with pytest.raises(DestinationExistsError, match="already exists"):
            export_inventory(rows, path.parent, now=NOW)
        assert path.stat().st_size > 0
