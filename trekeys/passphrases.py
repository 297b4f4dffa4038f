"""Passphrase strength checks with zxcvbn, and random passphrases.

zxcvbn estimates how many guesses an attacker needs, from dictionaries of
common passwords, names and words, keyboard patterns, dates and repeats. Its
feedback explains why a passphrase is weak, without repeating the passphrase.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from zxcvbn import zxcvbn

from trekeys import gpgrun
from trekeys.errors import WeakPassphraseError

# zxcvbn scores run from 0 to 4; 3 means "safely unguessable" (about 10^10
# guesses) against an offline attack on a slow hash.
MIN_PASSPHRASE_SCORE = 3


def check_passphrase_strength(
    passphrase: str,
    *,
    user_inputs: Sequence[str] = (),
    min_score: int = MIN_PASSPHRASE_SCORE,
) -> int:
    """Estimate how guessable a passphrase is with zxcvbn and reject weak ones.

    Args:
        passphrase: the passphrase; it never appears in a message or log.
        user_inputs: words an attacker would try first, such as the user name.
        min_score: the lowest zxcvbn score (0 to 4) accepted.

    Returns:
        The zxcvbn score.

    Raises:
        WeakPassphraseError: the score is below `min_score`; the message gives
            zxcvbn's warning and suggestions.
    """
    gpgrun.check_passphrase_characters(passphrase)
    result = zxcvbn(passphrase, user_inputs=list(user_inputs))
    score = int(result["score"])
    if score >= min_score:
        return score

    feedback = result.get("feedback") or {}
    reasons = [feedback.get("warning") or ""] + list(feedback.get("suggestions") or [])
    advice = " ".join(r.strip() for r in reasons if r and r.strip())
    raise WeakPassphraseError(
        f"the passphrase is too easy to guess (strength {score} of 4, at least "
        f"{min_score} required). {advice or 'Use a longer passphrase.'} "
        "Choose a longer passphrase of several uncommon words."
    )


def generate_passphrase() -> str:
    """Return a random passphrase of 144 bits, for demo users and rotations."""
    return secrets.token_urlsafe(18)
