"""Ceremony mode: roles, witnesses and deviations for interactive key procedures.

A `Ceremony` follows an approved script (`trekeys.procedures`). It starts
only when the roles the script requires are present, and every entry it
records goes straight into a hash-chained transcript on disk
(`trekeys.transcript`). A state-changing step names who acted and a witness
in another role. A step is never skipped in silence: a skip is a deviation,
with what happened, what was done instead and who acknowledged it. Steps,
once written, cannot be changed; a correction is a new deviation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trekeys.custodians import add_lab_custodians
from trekeys.errors import CeremonyError
from trekeys.evidence import ToolOutput, file_manifest, group_hex, sha256_file
from trekeys.lab import Lab
from trekeys.offline_signature import OfflineSigner
from trekeys.procedures import (
    Participant,
    Procedure,
    describe_missing,
    get_procedure,
    missing_roles,
)
from trekeys.records import utcnow
from trekeys.signing_key import create_signing_key, public_key_pem, signing_public_key
from trekeys.transcript import TranscriptJournal, load_journal
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

TRANSCRIPT_NAME = "transcript.jsonl"
# Folder and file name of the ceremony-signing public key that the lab publishes
# for offline verifiers.
PUBLISHED_DIR = "published"
PUBLIC_KEY_NAME = "ceremony-signing.pem"


class Ceremony:
    """One run of an approved procedure, recorded entry by entry.

    Use `Ceremony.start`. Participants are named by the name they gave.
    """

    def __init__(
        self,
        procedure: Procedure,
        participants: Sequence[Participant],
        folder: Path,
        *,
        dry_run: bool,
    ) -> None:
        self.procedure = procedure
        self.folder = Path(folder)
        self.dry_run = dry_run
        self.present: dict[str, Participant] = {}
        self.journal = TranscriptJournal(self.folder / TRANSCRIPT_NAME)
        self._done: set[str] = set()
        self._allowed_extra: set[str] = set()
        self._files: dict[str, tuple[str, str]] = {}
        for participant in participants:
            if participant.name in self.present:
                raise CeremonyError(
                    f"participant {participant.name!r} is listed twice; list each "
                    "person once, in the role they act in."
                )
            self.present[participant.name] = participant

    @classmethod
    def start(
        cls,
        procedure: str | Procedure,
        participants: Sequence[Participant],
        folder: Path,
        *,
        dry_run: bool,
        subject: str = "",
        environment: str = "",
    ) -> Ceremony:
        """Start a ceremony in a new, empty `folder` and record who is present.

        Raises:
            CeremonyError: a required role is absent, or `folder` is not empty.
        """
        script = get_procedure(procedure) if isinstance(procedure, str) else procedure
        missing = missing_roles(script, participants)
        if missing:
            raise CeremonyError(
                f"ceremony {script.name} cannot start: it needs "
                f"{describe_missing(missing)}; bring them in and start again."
            )
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise CeremonyError(
                f"ceremony folder {folder} is not empty; choose a new folder so that "
                "no earlier transcript is overwritten."
            )

        ceremony = cls(script, participants, folder, dry_run=dry_run)
        ceremony._append(
            "start",
            {
                "procedure": script.name,
                "title": script.title,
                "policy": script.policy,
                "subject": subject,
                "environment": environment,
                "participants": [p.to_dict() for p in participants],
                "planned_steps": [s.id for s in script.steps],
            },
        )
        logger.info("ceremony %s started in %s", script.name, folder)
        return ceremony

    @classmethod
    def resume(cls, folder: Path) -> Ceremony:
        """Reopen an unsealed ceremony from its transcript, to record more steps.

        The transcript is the only state, so a ceremony driven step by step
        from the command line picks up exactly what was recorded.

        Raises:
            TranscriptError: the transcript is damaged or already sealed.
            CeremonyError: the folder contains no ceremony.
        """
        path = Path(folder) / TRANSCRIPT_NAME
        if not path.is_file():
            raise CeremonyError(
                f"{folder} contains no ceremony transcript; start one with "
                "'trekeys ceremony start'."
            )
        journal = load_journal(path)
        start = journal.entries[0]
        ceremony = cls(
            get_procedure(start["procedure"]),
            [Participant.from_dict(p) for p in start["participants"]],
            Path(folder),
            dry_run=bool(start.get("dry_run")),
        )
        ceremony.journal = journal
        for entry in journal.entries[1:]:
            ceremony._replay(entry)
        return ceremony

    def _replay(self, entry: dict[str, Any]) -> None:
        kind = entry["type"]
        if kind == "join":
            participant = Participant.from_dict(entry["participant"])
            self.present[participant.name] = participant
        elif kind == "leave":
            self.present.pop(entry["participant"]["name"], None)
        elif kind == "step":
            self._done.add(entry["step_id"])
            self._allowed_extra.discard(entry["step_id"])
            for produced in entry.get("files", []):
                path = (self.folder / produced["path"]).resolve()
                self._files[str(path)] = (entry["step_id"], produced["sha256"])
        elif kind == "deviation":
            if entry.get("skipped"):
                self._done.add(entry["step_id"])
            elif self.procedure.step(entry["step_id"]) is None:
                self._allowed_extra.add(entry["step_id"])

    # Participants

    def participant(self, name: str) -> Participant:
        """Return the present participant called `name`.

        Raises:
            CeremonyError: nobody of that name is present.
        """
        if name not in self.present:
            raise CeremonyError(
                f"{name!r} is not present at ceremony {self.procedure.name}; present: "
                f"{', '.join(self.present) or 'nobody'}."
            )
        return self.present[name]

    def join(self, participant: Participant) -> None:
        """Record that a participant joined the ceremony.

        Raises:
            CeremonyError: someone of that name is already present.
        """
        if participant.name in self.present:
            raise CeremonyError(
                f"{participant.name} is already present at ceremony "
                f"{self.procedure.name}; each person is listed once."
            )
        self.present[participant.name] = participant
        self._append("join", {"participant": participant.to_dict()})

    def leave(self, name: str, reason: str) -> None:
        """Record that a participant left; later steps need the roles still present."""
        participant = self.participant(name)
        del self.present[name]
        self._append("leave", {"participant": participant.to_dict(), "reason": reason})

    # Steps and deviations

    @property
    def pending_steps(self) -> list[str]:
        """The planned steps neither performed nor recorded as skipped, in order."""
        return [s.id for s in self.procedure.steps if s.id not in self._done]

    def perform(
        self,
        step_id: str,
        *,
        by: str,
        witness: str | None = None,
        outcome: str,
        evidence: Sequence[ToolOutput | dict[str, Any]] = (),
        files: Sequence[Path] = (),
        fingerprints: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Record a step: who acted, who witnessed, what came out, and the evidence.

        Args:
            step_id: the next planned step, or an extra step announced by a
                deviation.
            by: the name of the participant who acted.
            witness: the name of a participant in another role who watched;
                required for state-changing steps.
            outcome: one sentence on what the step achieved.
            evidence: tool outputs and other evidence, already redacted.
            files: files the step produced; they are hashed now and again at
                the seal.
            fingerprints: labelled hex fingerprints for the witness to read aloud.

        Raises:
            CeremonyError: a required role is absent, the step is out of order
                or unknown, the actor's role may not do it, or the witness is
                missing or in the same role.
        """
        self._require_roles()
        planned = self.procedure.step(step_id)
        self._check_order(step_id, planned is not None)
        actor = self.participant(by)
        if planned is not None and planned.roles and actor.role not in planned.roles:
            raise CeremonyError(
                f"step {step_id} must be performed by a {' or '.join(planned.roles)}, "
                f"not by {actor.name} ({actor.role})."
            )
        needs_witness = planned is None or planned.state_changing
        witnessed = self._witness(step_id, actor, witness, required=needs_witness)

        produced = []
        for path in files:
            resolved = Path(path).resolve()
            digest = sha256_file(resolved)
            self._files[str(resolved)] = (step_id, digest)
            shown = resolved
            if resolved.is_relative_to(self.folder.resolve()):
                shown = resolved.relative_to(self.folder.resolve())
            produced.append({"path": str(shown), "sha256": digest})
        entry = self._append(
            "step",
            {
                "step_id": step_id,
                "planned": planned is not None,
                "title": planned.title if planned else "extra step",
                "actor": actor.to_dict(),
                "witness": witnessed,
                "outcome": outcome,
                "evidence": [_evidence_dict(item) for item in evidence],
                "files": produced,
                "fingerprints": {
                    label: group_hex(value)
                    for label, value in (fingerprints or {}).items()
                },
            },
        )
        self._done.add(step_id)
        logger.info("ceremony step %s done by %s", step_id, actor.name)
        return entry

    def deviate(
        self,
        step_id: str,
        *,
        what_happened: str,
        instead: str,
        reported_by: str,
        acknowledged_by: str,
        skipped: bool = False,
    ) -> dict[str, Any]:
        """Record a deviation at a step: what happened, what was done instead, and
        who acknowledged it (a participant in another role than the reporter).

        A deviation at a step id that is not in the script allows one extra
        step of that id to be performed afterwards.

        Raises:
            CeremonyError: the acknowledgment is missing or from the same role.
        """
        reporter = self.participant(reported_by)
        acknowledgment = self._witness(
            step_id, reporter, acknowledged_by, required=True
        )
        if skipped and self.procedure.step(step_id) is None:
            raise CeremonyError(
                f"step {step_id} is not in the {self.procedure.name} script, so it "
                "cannot be skipped; record a plain deviation instead."
            )
        entry = self._append(
            "deviation",
            {
                "step_id": step_id,
                "skipped": skipped,
                "what_happened": what_happened,
                "instead": instead,
                "reported_by": reporter.to_dict(),
                "acknowledged_by": acknowledgment,
            },
        )
        if skipped:
            self._done.add(step_id)
        elif self.procedure.step(step_id) is None:
            self._allowed_extra.add(step_id)
        logger.info("ceremony deviation at step %s: %s", step_id, what_happened)
        return entry

    def skip(
        self,
        step_id: str,
        *,
        reason: str,
        instead: str,
        reported_by: str,
        acknowledged_by: str,
    ) -> dict[str, Any]:
        """Record a planned step as skipped: a deviation, never a silent gap."""
        return self.deviate(
            step_id,
            what_happened=f"step skipped: {reason}",
            instead=instead,
            reported_by=reported_by,
            acknowledged_by=acknowledged_by,
            skipped=True,
        )

    # Sealing

    def seal(
        self, vault: Vault, *, offline_signer: OfflineSigner | None = None
    ) -> Path:
        """Write the file manifest and the end entry, then sign and seal.

        Raises:
            CeremonyError: a planned step was neither performed nor skipped.
        """
        if self.pending_steps:
            raise CeremonyError(
                f"ceremony {self.procedure.name} cannot be sealed: steps "
                f"{', '.join(self.pending_steps)} were neither performed nor skipped; "
                "perform them or record each as a skip with its reason."
            )
        # A seal that failed after the end entry (say, a wrong offline
        # passphrase) is retried without a second manifest.
        if not self.ended:
            self._append("manifest", {"files": self._manifest()})
            deviations = [e for e in self.journal.entries if e["type"] == "deviation"]
            self._append(
                "end",
                {
                    "steps": sum(
                        1 for e in self.journal.entries if e["type"] == "step"
                    ),
                    "deviations": len(deviations),
                },
            )
        self.journal.seal(vault, offline_signer=offline_signer)
        return self.journal.path

    @property
    def ended(self) -> bool:
        """Whether the end entry is written, so that only the seal may follow."""
        return bool(self.journal.entries) and self.journal.entries[-1]["type"] == "end"

    def _manifest(self) -> list[dict[str, Any]]:
        transcript = self.journal.path.resolve()
        paths = {Path(p) for p in self._files}
        if self.folder.is_dir():
            paths |= {p.resolve() for p in self.folder.rglob("*") if p.is_file()}
        paths.discard(transcript)
        rows = file_manifest(sorted(paths), base=self.folder)
        for path, row in zip(sorted(paths), rows, strict=True):
            step_id, digest = self._files.get(str(path), ("", row["sha256"]))
            row["step_id"] = step_id
            row["changed_since_step"] = digest != row["sha256"]
        return rows

    # Internals

    def _append(self, entry_type: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.ended:
            raise CeremonyError(
                f"ceremony {self.procedure.name} has ended and only its seal may "
                "follow; run 'trekeys ceremony seal' on it."
            )
        return self.journal.append(entry_type, {**body, "dry_run": self.dry_run})

    def _require_roles(self) -> None:
        missing = missing_roles(self.procedure, self.present.values())
        if missing:
            raise CeremonyError(
                f"ceremony {self.procedure.name} cannot go on: it needs "
                f"{describe_missing(missing)}; wait until they return or record "
                "the interruption as a deviation and stop."
            )

    def _check_order(self, step_id: str, planned: bool) -> None:
        if step_id in self._done:
            raise CeremonyError(
                f"step {step_id} is already recorded and cannot be changed; record a "
                "deviation and, if it must be repeated, a new extra step."
            )
        if not planned:
            if step_id not in self._allowed_extra:
                raise CeremonyError(
                    f"step {step_id} is not in the {self.procedure.name} script; "
                    "record a deviation at it before performing it."
                )
            self._allowed_extra.discard(step_id)
            return
        expected = self.pending_steps[0]
        if step_id != expected:
            raise CeremonyError(
                f"step {step_id} cannot come before step {expected}; perform "
                f"{expected} or record it as skipped."
            )

    def _witness(
        self, step_id: str, actor: Participant, name: str | None, *, required: bool
    ) -> dict[str, Any] | None:
        if name is None:
            if required:
                raise CeremonyError(
                    f"step {step_id} changes state and needs a witness in another "
                    f"role than {actor.role}; name the witness."
                )
            return None
        witness = self.participant(name)
        if witness.role == actor.role or witness.name == actor.name:
            raise CeremonyError(
                f"{witness.name} cannot witness step {step_id}: the witness must be "
                f"in another role than {actor.role}."
            )
        return {**witness.to_dict(), "acknowledged": True}


def _evidence_dict(item: ToolOutput | dict[str, Any]) -> dict[str, Any]:
    return item.to_dict() if isinstance(item, ToolOutput) else dict(item)


def new_ceremony_folder(base: Path, procedure: str) -> Path:
    """Create and return a new folder ``<procedure>-<UTC time>`` under `base`."""
    stamp = utcnow().strftime("%Y%m%dt%H%M%Sz")
    base.mkdir(parents=True, exist_ok=True)
    for suffix in ["", *(f"-{n}" for n in range(1, 100))]:
        folder = base / f"{procedure}-{stamp}{suffix}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise CeremonyError(f"could not create a new ceremony folder in {base}.")


def start_lab_ceremony(
    lab: Lab,
    procedure: str,
    participants: Sequence[Participant],
    folder: Path,
    *,
    subject: str = "",
) -> Ceremony:
    """Start a ceremony on the demo TRE; it is always marked as a dry run."""
    return Ceremony.start(
        procedure,
        participants,
        folder,
        dry_run=True,
        subject=subject,
        environment=f"demo TRE at {lab.root}",
    )


def build_lab(lab: Lab, vault: Vault) -> None:
    """Lab step: create the ceremony-signing key, publish its public key, and
    fill the custodian register from the lab's custodians."""
    create_signing_key(vault)
    published = lab.root / PUBLISHED_DIR
    published.mkdir(mode=0o755, exist_ok=True)
    target = published / PUBLIC_KEY_NAME
    target.write_text(public_key_pem(signing_public_key(vault)), encoding="ascii")
    add_lab_custodians(lab, vault)
