"""The volume recovery drill: restore a header, recover the key, decrypt, compare.

The drill proves policy 4.4 ("routine tests ... restore and decrypt user data
by recovering the associated storage volume and its encryption key") without
device-mapper. It works on a copy of the volume in a private scratch folder
and never writes to the live volume. It destroys the copy's header, restores
it from the vault's header backup and opens it with the escrowed recovery
passphrase. Then it recovers the volume key, decrypts the data segment in
user space (`trekeys.xts`), extracts the ext4 file system with ``debugfs``
and compares every file with the manifest. A second path proves recovery from the
escrowed volume key alone after every keyslot is erased. The scratch folder,
with every decrypted byte, is removed when the drill ends, fails, or its
process exits.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from trekeys.cryptsetup import KdfSettings, run_tool, secret_file
from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    HeaderBackupError,
    IntegrityError,
    ManifestMismatchError,
    NotLuksError,
    ToolError,
    VolumeError,
)
from trekeys.lab import Lab
from trekeys.luks import (
    build_manifest,
    current_key,
    export_header_backup,
    read_escrowed_volume_key,
    read_manifest,
    volume_path,
)
from trekeys.luks2meta import LuksHeader, Segment, read_header
from trekeys.luks_device import (
    add_keyslot_from_volume_key,
    dump_volume_key,
    erase_keyslots,
    extract_ext4,
    make_private,
    restore_header,
    verify_key,
)
from trekeys.luks_headers import verify_media_backup
from trekeys.records import KeyKind, utcnow
from trekeys.vault import Vault
from trekeys.xts import XtsDecryptor, decrypt_stream

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = "luks-drill-"
# Folders that mke2fs creates and that the manifest of user files leaves out.
_FILE_SYSTEM_FOLDERS = {"lost+found"}


def decrypt_segment(
    device: Path, volume_key: bytes, segment: Segment, target: Path
) -> int:
    """Decrypt the data segment of `device` into the new file `target`.

    The output is written under a temporary name and renamed when complete;
    a partial output is removed on failure.

    Returns:
        The number of bytes decrypted.
    """
    if segment.mode != "aes-xts":
        raise VolumeError(
            f"{device} uses cipher {segment.cipher}; only aes-xts can be decrypted "
            "in user space, map it with device-mapper instead."
        )
    decryptor = XtsDecryptor(
        volume_key,
        segment.sector_size,
        iv_scheme=segment.iv_scheme,
        iv_offset=segment.iv_tweak,
    )
    total = segment.size
    if total is None:
        total = device.stat().st_size - segment.offset
    total -= total % segment.sector_size

    partial = target.with_name(f".{target.name}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with device.open("rb") as source, os.fdopen(fd, "wb") as sink:
            source.seek(segment.offset)
            done = decrypt_stream(source, sink, decryptor, length=total)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return done


def compare_with_manifest(folder: Path, manifest: list[dict[str, object]]) -> int:
    """Check that `folder` contains exactly the manifest's files, sizes and hashes.

    Returns:
        The number of files checked.

    Raises:
        ManifestMismatchError: naming the missing, changed and unexpected files.
    """
    recovered = {
        str(entry["path"]): entry
        for entry in build_manifest(folder)
        if str(entry["path"]).split("/", 1)[0] not in _FILE_SYSTEM_FOLDERS
    }
    expected = {str(entry["path"]): entry for entry in manifest}
    missing = sorted(expected.keys() - recovered.keys())
    unexpected = sorted(recovered.keys() - expected.keys())
    changed = sorted(
        path
        for path in expected.keys() & recovered.keys()
        if expected[path]["size"] != recovered[path]["size"]
        or expected[path]["sha256"] != recovered[path]["sha256"]
    )
    if missing or changed or unexpected:
        parts = [
            f"{label}: {', '.join(paths)}"
            for label, paths in (
                ("missing", missing),
                ("changed", changed),
                ("unexpected", unexpected),
            )
            if paths
        ]
        raise ManifestMismatchError(
            f"the recovered files differ from the manifest ({'; '.join(parts)}); "
            "keep the scratch evidence and report it to the Information Security "
            "Manager.",
            missing=missing,
            changed=changed,
            unexpected=unexpected,
        )
    return len(expected)


def remove_stale_scratch(lab: Lab) -> list[Path]:
    """Remove scratch folders whose drill process is gone (a killed kernel).

    Each scratch folder stores the process id of its drill in ``owner.pid``;
    folders of running processes are left alone.
    """
    removed: list[Path] = []
    if not lab.work_dir.is_dir():
        return removed
    for folder in lab.work_dir.glob(f"{SCRATCH_PREFIX}*"):
        if _owner_alive(folder / "owner.pid"):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        logger.warning("removed scratch data %s left by an earlier drill", folder)
    return removed


def _owner_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text(encoding="ascii"))
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


@dataclass
class RecoveryDrill:
    """One run of the recovery drill on a copy of one instance's volume.

    Create it with `RecoveryDrill.start`; call the steps in order, and
    `cleanup` at the end (it also runs when the process exits).
    """

    lab: Lab
    vault: Vault
    instance: str
    scratch: Path
    volume_id: str
    passphrase_id: str
    boot_key_id: str
    live: Path
    files_checked: int = 0
    # What each successful step proved, for the audit entry of the proof.
    proven: list[str] = field(default_factory=list)
    _key_source: str = ""
    _live_state: tuple[int, int] = (0, 0)
    _header: LuksHeader | None = None
    _volume_key: bytes | None = field(default=None, repr=False)

    @classmethod
    def start(cls, lab: Lab, vault: Vault, instance: str) -> RecoveryDrill:
        """Set up a private scratch folder for a drill on `instance`'s volume."""
        remove_stale_scratch(lab)
        volume = current_key(vault, instance, KeyKind.LUKS_VOLUME)
        passphrase = current_key(vault, instance, KeyKind.LUKS_PASSPHRASE)
        boot_key = current_key(vault, instance, KeyKind.LUKS_BOOT_KEY)
        live = volume_path(lab, volume)
        if not live.exists():
            raise VolumeError(
                f"the volume of instance {instance} ({live}) does not exist; check "
                f"the device attribute of {volume.id}."
            )

        lab.work_dir.mkdir(mode=0o700, exist_ok=True)
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        scratch = (
            lab.work_dir / f"{SCRATCH_PREFIX}{instance}-{stamp}-{secrets.token_hex(3)}"
        )
        scratch.mkdir(mode=0o700)
        pid_fd = os.open(scratch / "owner.pid", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(pid_fd, "w", encoding="ascii") as pid_file:
            pid_file.write(str(os.getpid()))
        drill = cls(
            lab, vault, instance, scratch, volume.id, passphrase.id, boot_key.id, live
        )
        drill._live_state = _state_of(live)
        weakref.finalize(drill, shutil.rmtree, str(scratch), True)
        logger.info("recovery drill on %s in %s", volume.id, scratch)
        return drill

    # Path 1: header destroyed, restored from the backup, passphrase, decrypt.

    def copy_volume(self, name: str = "volume.img") -> Path:
        """Copy the live volume into the scratch folder (read only on the live one)."""
        target = self.scratch / name
        shutil.copyfile(self.live, target)
        target.chmod(0o600)
        return target

    def destroy_header(self, copy: Path) -> bool:
        """Overwrite the copy's header and keyslot areas; return that it is gone."""
        header = read_header(copy)
        with copy.open("r+b") as handle:
            handle.write(bytes(header.metadata_end))
        try:
            verify_key(copy, b"no key opens a volume without a header")
        except NotLuksError:
            return True
        return False

    def restore_header(self, copy: Path) -> LuksHeader:
        """Verify the vault's header backup, then write it onto the copy."""
        backup = self.scratch / "header-backup.img"
        export_header_backup(self.vault, self.volume_id, backup)
        restore_header(copy, backup)
        self._header = read_header(copy)
        self.proven.append("header restored from the vault's backup")
        return self._header

    def test_passphrase(self, copy: Path) -> None:
        """Open the copy with the escrowed recovery passphrase (test only)."""
        passphrase = self.vault.read_secret(self.passphrase_id, "recovery drill")
        verify_key(copy, passphrase)
        self.proven.append(f"{self.passphrase_id} opens the volume")

    def test_boot_key(self, copy: Path) -> None:
        """Open the copy with the escrowed boot key (test only)."""
        boot_key = self.vault.read_secret(self.boot_key_id, "recovery drill")
        verify_key(copy, boot_key)
        self.proven.append(f"{self.boot_key_id} opens the volume")

    def recover_volume_key(self, copy: Path) -> bool:
        """Unlock the volume key with the passphrase; return it matches the escrow."""
        passphrase = self.vault.read_secret(self.passphrase_id, "recovery drill")
        self._volume_key = dump_volume_key(copy, passphrase)
        escrowed = self.vault.read_secret(self.volume_id, "recovery drill: compare")
        self._key_source = "the volume key unlocked by the passphrase"
        return secrets.compare_digest(self._volume_key, escrowed)

    def decrypt_and_extract(self, copy: Path, name: str = "files") -> Path:
        """Decrypt the copy's data segment and extract its files; return the folder."""
        if self._volume_key is None:
            raise CredentialError(
                f"no volume key was recovered for {self.volume_id}; run the key "
                "recovery step first."
            )
        segment = read_header(copy).data_segment()
        image = self.scratch / f"{name}.decrypted.img"
        decrypt_segment(copy, self._volume_key, segment, image)
        folder = self.scratch / name
        extract_ext4(image, folder)
        image.unlink()
        return folder

    def compare(self, folder: Path) -> int:
        """Compare the extracted files with the vault's manifest."""
        self.files_checked = compare_with_manifest(
            folder, read_manifest(self.vault, self.volume_id)
        )
        self.proven.append(
            f"{self.files_checked} files decrypted with {self._key_source} "
            "match the manifest"
        )
        return self.files_checked

    # Path 2: every keyslot lost, the escrowed volume key alone.

    def erase_keyslots(self, copy: Path) -> bool:
        """Erase every keyslot of a copy; return that the passphrase no longer opens."""
        erase_keyslots(copy)
        passphrase = self.vault.read_secret(self.passphrase_id, "recovery drill")
        try:
            verify_key(copy, passphrase)
        except CredentialError:
            return True
        return False

    def use_escrowed_volume_key(self) -> None:
        """Take the volume key from the escrow, checked against the header digest."""
        self._volume_key = read_escrowed_volume_key(
            self.vault, self.volume_id, "recovery drill: keyslots lost"
        )
        self._key_source = f"the escrowed {self.volume_id} alone"

    def add_keyslot_from_escrow(self, copy: Path) -> None:
        """Give the copy a new keyslot from the escrowed volume key, and test it."""
        if self._volume_key is None:
            raise CredentialError(
                f"no volume key was taken from the escrow for {self.volume_id}."
            )
        fresh = secrets.token_bytes(32)
        add_keyslot_from_volume_key(
            copy, self._volume_key, fresh, kdf=KdfSettings.test()
        )
        verify_key(copy, fresh)
        self.proven.append("a new keyslot made from the escrowed volume key opens")

    # End of the drill

    def live_unchanged(self) -> bool:
        """Return whether the live volume's size and mtime are as before the drill."""
        return _state_of(self.live) == self._live_state

    @property
    def key_ids(self) -> list[str]:
        """The volume key, recovery passphrase and boot key that this drill proves."""
        return [self.volume_id, self.passphrase_id, self.boot_key_id]

    def proof_detail(self) -> str:
        """Describe what the drill's steps proved, for the recovery proof's audit entry.

        Raises:
            IntegrityError: no step of this drill has proved anything yet.
        """
        if not self.proven:
            raise IntegrityError(
                f"the recovery drill on {self.volume_id} has proved nothing yet; run "
                "its steps before recording the proof."
            )
        return f"proved {'; '.join(self.proven)}"

    def record_proof(self, report: str = "", *, origin: str = "drill") -> str:
        """Store the time and report of this recovery on the volume's key records.

        Every record gets the same ``last_recovery_proof`` time and
        ``last_recovery_report``, so that no record keeps pointing at an older
        run. Without `report`, the drill identifies itself as
        "<origin> <UTC time> by <actor>". The audit entries list what the
        drill's steps proved. The CLI and `run_recovery_drill` record proofs
        this way; a runbook claims them with `runbook.record_recovery_proof`
        instead, so that the drill runner records them only if the drill passes.

        Returns:
            The proof time, in ISO 8601 UTC.

        Raises:
            IntegrityError: no step of this drill has proved anything yet.
        """
        proved = self.proof_detail()
        when = utcnow().isoformat()
        if not report:
            report = f"{origin} {when} by {self.vault.actor.name}"
        detail = f"{report}: {proved}"
        for key_id in self.key_ids:
            record = self.vault.get(key_id)
            record.attributes["last_recovery_proof"] = when
            record.attributes["last_recovery_report"] = report
            self.vault.update(record, operation="recovery-proof", detail=detail)
        return when

    def cleanup(self) -> bool:
        """Remove the scratch folder and its decrypted data; return that it is gone."""
        self._volume_key = None
        shutil.rmtree(self.scratch, ignore_errors=True)
        return not self.scratch.exists()


def _state_of(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


@dataclass
class DrillOutcome:
    """The results of one complete recovery drill."""

    instance: str
    uuid: str
    files_from_passphrase: int
    files_from_escrow: int
    live_unchanged: bool
    proved_at: str


def run_recovery_drill(
    lab: Lab, vault: Vault, instance: str, *, report: str = "", origin: str = "drill"
) -> DrillOutcome:
    """Run both recovery paths on copies of `instance`'s volume, then clean up.

    `report` and `origin` identify the run on the key records (see
    `RecoveryDrill.record_proof`).

    Raises:
        HeaderBackupError: the header backup copy on the backup media is
            missing, differs from the vault's backup, or is of another volume.
        IntegrityError: a step failed; the scratch folder is removed anyway.
    """
    drill = RecoveryDrill.start(lab, vault, instance)
    try:
        # A drill that passes must prove the backup media copy usable as well.
        verify_media_backup(lab, vault, drill.volume_id)
        copy = drill.copy_volume()
        if not drill.destroy_header(copy):
            raise IntegrityError(
                f"the header of the copy {copy} could not be destroyed."
            )
        header = drill.restore_header(copy)
        drill.test_passphrase(copy)
        drill.test_boot_key(copy)
        if not drill.recover_volume_key(copy):
            raise CredentialError(
                f"the volume key in {drill.volume_id} differs from the one the "
                "passphrase unlocks; escrow the right key with 'trekeys volume "
                "backup-header' and investigate."
            )
        by_passphrase = drill.compare(drill.decrypt_and_extract(copy))

        second = drill.copy_volume("keyslots-lost.img")
        if not drill.erase_keyslots(second):
            raise IntegrityError(
                f"the keyslots of the copy {second} survived luksErase."
            )
        drill.use_escrowed_volume_key()
        by_escrow = drill.compare(drill.decrypt_and_extract(second, "files-escrow"))
        drill.add_keyslot_from_escrow(second)

        unchanged = drill.live_unchanged()
        proved = drill.record_proof(report, origin=origin) if unchanged else ""
        return DrillOutcome(
            instance, header.uuid, by_passphrase, by_escrow, unchanged, proved
        )
    finally:
        drill.cleanup()


def recover_files(
    lab: Lab,
    vault: Vault,
    instance: str,
    target: Path,
    *,
    use_device_mapper: bool = False,
) -> int:
    """Recover the files of `instance`'s volume into the new folder `target`.

    Works on a copy of the volume in user space, or, with `use_device_mapper`
    on a host that has it, maps the live volume read-only and mounts it. In
    user space, a copy whose live header is unreadable first gets the vault's
    header backup. `target` is created with mode 0700, and no recovered file or
    folder is readable by group or others: the files are copied into a private
    staging folder next to `target`, made private, and only then renamed.

    Returns:
        The number of files recovered.

    Raises:
        DestinationExistsError: `target` exists; nothing is written.
    """
    if target.exists():
        raise DestinationExistsError(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp creates the staging folder 0700, so nothing copied into it is
    # reachable by other users before make_private has run.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        files = staging / "files"
        if use_device_mapper:
            _recover_with_device_mapper(lab, vault, instance, files)
        else:
            _recover_in_user_space(lab, vault, instance, files)
        make_private(files)
        if target.exists():
            raise DestinationExistsError(target)
        files.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sum(1 for p in target.rglob("*") if p.is_file())


def _recover_in_user_space(lab: Lab, vault: Vault, instance: str, target: Path) -> None:
    drill = RecoveryDrill.start(lab, vault, instance)
    restored = False
    try:
        copy = drill.copy_volume()
        restored = _restore_unreadable_header(drill, copy)
        drill.use_escrowed_volume_key()
        folder = drill.decrypt_and_extract(copy)
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("lost+found"))
    except IntegrityError as error:
        # Only extraction raises a plain IntegrityError once the header is back.
        if not restored or isinstance(error, HeaderBackupError):
            raise
        raise IntegrityError(
            f"the header of {drill.live} was restored from the vault's backup on a "
            "scratch copy, but its data area contains no readable file system, so "
            "the data is damaged too; restore the files from a data backup."
        ) from error
    finally:
        drill.cleanup()


def _restore_unreadable_header(drill: RecoveryDrill, copy: Path) -> bool:
    """Put the vault's header backup onto `copy` when the live header is unreadable.

    `RecoveryDrill.restore_header` first checks the backup against the SHA-256
    and LUKS UUID that the vault recorded for the volume, so a backup of
    another volume is never written. Only the scratch copy is changed.

    Returns:
        Whether the header was restored.

    Raises:
        HeaderBackupError: the live header is unreadable and the vault's
            backup cannot replace it.
    """
    try:
        read_header(drill.live)
        return False
    except (VolumeError, HeaderBackupError) as error:
        logger.warning(
            "the LUKS header of %s is unreadable, so the header backup of %s is "
            "restored on a scratch copy: %s",
            drill.live,
            drill.volume_id,
            error,
        )

    try:
        drill.restore_header(copy)
    except (HeaderBackupError, VolumeError, ToolError) as error:
        raise HeaderBackupError(
            f"the LUKS header of {drill.live} is unreadable and the vault's header "
            f"backup of {drill.volume_id} cannot replace it ({error}); recover the "
            "volume from another header backup or a data backup."
        ) from error
    return True


def _recover_with_device_mapper(
    lab: Lab, vault: Vault, instance: str, target: Path
) -> None:
    volume = current_key(vault, instance, KeyKind.LUKS_VOLUME)
    device = volume_path(lab, volume)
    volume_key = read_escrowed_volume_key(vault, volume.id, "recovery with dm-crypt")
    name = f"trekeys-recover-{instance}-{secrets.token_hex(3)}"
    mountpoint = Path(tempfile.mkdtemp(prefix="trekeys-mount-"))
    with secret_file(volume_key) as key_file:
        run_tool(
            "cryptsetup",
            ["open", "--readonly", f"--volume-key-file={key_file}", str(device), name],
            device=device,
        )
    try:
        run_tool("mount", ["-o", "ro", f"/dev/mapper/{name}", str(mountpoint)])
        try:
            shutil.copytree(
                mountpoint, target, ignore=shutil.ignore_patterns("lost+found")
            )
        finally:
            run_tool("umount", [str(mountpoint)])
    finally:
        run_tool("cryptsetup", ["close", name], device=device)
        mountpoint.rmdir()
