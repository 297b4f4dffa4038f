"""How the compromise analysis scales: impact and plan of the vault master.

The vault master protects every key, so its impact walks the whole graph and
its plan orders every key. No key manager offers this analysis to compare
against, so the reference is the same work on a vault ten times smaller. The
work sorts the keys, so the expected growth is n log n: about 13.3 times the
time for 10 times the keys at 10,000 keys. The target, 15 times, adds room
for timer noise while still catching a quadratic step (100 times).
The records are built in memory, because the vault's own add and save costs
are measured apart.
"""

from __future__ import annotations

import gc
import time

from benchmarks.common import Ratio
from trekeys.depgraph import DependencyGraph
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.response_plan import plan_from_graph

ALL_ROTATORS = {kind: "trekeys.records:utcnow" for kind in KeyKind}


def build_records(instances: int) -> list[KeyRecord]:
    """Return the records of a TRE with `instances` project instances, 10 keys each."""
    records = [_record("tre/vault-master", KeyKind.VAULT_MASTER, ["key:*"])]
    records.append(_record("tls/ca", KeyKind.TLS_CA, [], signs=["crl:tls/ca"]))
    for number in range(instances):
        name = f"i{number:05d}"
        backups = [f"backup:{name}/2026-12-0{day}" for day in (1, 2)]
        records += [
            _record(f"{name}/luks-volume", KeyKind.LUKS_VOLUME, [f"volume:{name}"]),
            _record(
                f"{name}/luks-passphrase",
                KeyKind.LUKS_PASSPHRASE,
                [f"key:{name}/luks-volume"],
            ),
            _record(
                f"{name}/luks-boot-key",
                KeyKind.LUKS_BOOT_KEY,
                [f"key:{name}/luks-volume"],
            ),
            _record(f"{name}/gpg", KeyKind.GPG, backups),
            _record(f"{name}/wrap", KeyKind.WRAPPING, [f"key:{name}/files"]),
            _record(f"{name}/files", KeyKind.FILE_KEY, [f"files:{name}-user"]),
            _record(f"{name}/ssh", KeyKind.SSH, [f"account:{name}-user"]),
            _record(f"{name}/mac", KeyKind.MAC, [f"manifest:{name}/import-1"]),
            _record(f"{name}/tls", KeyKind.TLS_CERT, [f"service:{name}.tre.internal"]),
            _record(
                f"{name}/signing", KeyKind.SIGNING, [], signs=[f"report:{name}-run-1"]
            ),
        ]
        records[1].signs.append(f"cert:{name}/tls")
    return records


def _record(
    key_id: str, kind: KeyKind, protects: list[str], signs: list[str] | None = None
) -> KeyRecord:
    return KeyRecord(
        id=key_id,
        kind=kind,
        purpose="benchmark",
        owner="tre",
        state=KeyState.ACTIVE,
        protects=protects,
        signs=signs or [],
    )


def time_plan(records: list[KeyRecord], repeats: int = 3) -> float:
    """Return the best seconds taken to build the graph and the vault master's plan."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        graph = DependencyGraph(records)
        plan = plan_from_graph(graph, "tre/vault-master", rotators=ALL_ROTATORS)
        best = min(best, time.perf_counter() - started)
        if len(plan.steps) != len(records):
            raise RuntimeError("the plan does not cover every key")
    return best


def measure(quick: bool) -> list[Ratio]:
    small_instances = 20 if quick else 100
    small = time_plan(build_records(small_instances))
    large = time_plan(build_records(small_instances * 10))
    keys = small_instances * 10 * 10 + 2
    ratio = large / small
    return [
        Ratio(
            name=f"vault-master impact and plan, {keys} keys vs a tenth",
            measured=large,
            reference=small,
            unit="s",
            ratio=ratio,
            target="ratio <= 15 (n log n)",
            passed=ratio <= 15,
        )
    ]
