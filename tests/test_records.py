from datetime import timedelta

import pytest

from trekeys.errors import RecordError, StateTransitionError
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow


def make_record(**values) -> KeyRecord:
    fields = {"id": "alpha/mac", "kind": KeyKind.MAC, "purpose": "test", "owner": "tre"}
    return KeyRecord(**{**fields, **values})


def test_activation_sets_activated_date():
    record = make_record()
    record.transition(KeyState.ACTIVE, "in service")
    assert record.state is KeyState.ACTIVE
    assert record.activated is not None
    assert record.history[-1]["from"] == "pre-activation"
    assert record.history[-1]["to"] == "active"


@pytest.mark.parametrize(
    ("path", "forbidden"),
    [
        ([], KeyState.SUSPENDED),
        ([KeyState.ACTIVE, KeyState.DEACTIVATED], KeyState.ACTIVE),
        ([KeyState.ACTIVE, KeyState.DEACTIVATED, KeyState.DESTROYED], KeyState.ACTIVE),
        ([KeyState.ACTIVE, KeyState.COMPROMISED], KeyState.ACTIVE),
        (
            [KeyState.ACTIVE, KeyState.COMPROMISED, KeyState.DESTROYED_COMPROMISED],
            KeyState.DESTROYED,
        ),
    ],
)
def test_forbidden_transition_raises(path, forbidden):
    record = make_record()
    for state in path:
        record.transition(state, "setup")
    with pytest.raises(StateTransitionError, match="cannot go from"):
        record.transition(forbidden, "not allowed")
    assert record.state is (path[-1] if path else KeyState.PRE_ACTIVATION)


def test_destroyed_key_may_be_found_compromised_later():
    record = make_record()
    for state in (KeyState.ACTIVE, KeyState.DEACTIVATED, KeyState.DESTROYED):
        record.transition(state, "lifecycle")
    record.transition(KeyState.DESTROYED_COMPROMISED, "leak found in old backup")
    assert record.is_tombstone


def test_round_trip_keeps_every_field():
    record = make_record(
        expires=utcnow() + timedelta(days=3),
        cryptoperiod_days=90,
        protects=["volume:alpha"],
        attributes={"uuid": "1234", "note": "naïve 'quoted' \"text\""},
    )
    record.transition(KeyState.ACTIVE, "go")
    copy = KeyRecord.from_dict(record.to_dict())
    assert copy == record


def test_invalid_id_rejected():
    with pytest.raises(RecordError, match="invalid key id"):
        make_record(id="Has Spaces")


def test_cryptoperiod_end_is_earliest_of_expiry_and_period():
    now = utcnow()
    record = make_record(expires=now + timedelta(days=400), cryptoperiod_days=30)
    record.transition(KeyState.ACTIVE, "go", at=now)
    assert record.cryptoperiod_end() == now + timedelta(days=30)
