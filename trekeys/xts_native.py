"""Build and load the compiled AES-XTS loop that `trekeys.xts` prefers.

The loop is a few lines of C that call OpenSSL's own AES-XTS (EVP, from the
system libcrypto.so.3) once per sector with one cipher context, resetting
only the IV. It is compiled with cffi on first use into a cache folder
(``$XDG_CACHE_HOME/trekeys`` or ``~/.cache/trekeys``), under a file lock so
that concurrent processes build it once. The EVP prototypes are declared
here, so the OpenSSL headers (libssl-dev) are not needed; only a C compiler,
the Python headers and libcrypto.so.3.

This module does not receive the key: `trekeys.xts` passes it straight to
the compiled function. `load` returns None when the build fails, and the caller
falls back to its numpy path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

MODULE_NAME = "_trekeys_xts"
LIBCRYPTO = "libcrypto.so.3"

CDEF = """
int trekeys_xts_decrypt(const unsigned char *key, int key_len,
                        const unsigned char *source, unsigned char *target,
                        size_t sectors, size_t sector_size,
                        uint64_t first_iv, uint64_t iv_step, int plain32);
"""

# Returns 0 on success, or the step that failed: 1 context, 2 key, 3 sector.
SOURCE = """
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct engine_st ENGINE;
const EVP_CIPHER *EVP_aes_128_xts(void);
const EVP_CIPHER *EVP_aes_256_xts(void);
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher,
                       ENGINE *impl, const unsigned char *key,
                       const unsigned char *iv);
int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                      const unsigned char *in, int inl);

int trekeys_xts_decrypt(const unsigned char *key, int key_len,
                        const unsigned char *source, unsigned char *target,
                        size_t sectors, size_t sector_size,
                        uint64_t first_iv, uint64_t iv_step, int plain32)
{
    const EVP_CIPHER *cipher = key_len == 32 ? EVP_aes_128_xts()
                                             : EVP_aes_256_xts();
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    unsigned char iv[16];
    uint64_t number = first_iv;
    int status = 0;
    int written;

    if (ctx == NULL)
        return 1;
    if (EVP_DecryptInit_ex(ctx, cipher, NULL, key, NULL) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return 2;
    }
    memset(iv, 0, sizeof iv);
    for (size_t index = 0; index < sectors; index++) {
        uint64_t value = plain32 ? (number & 0xFFFFFFFFu) : number;
        for (int byte = 0; byte < 8; byte++)
            iv[byte] = (unsigned char)(value >> (8 * byte));
        if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1
            || EVP_DecryptUpdate(ctx, target, &written, source,
                                 (int)sector_size) != 1) {
            status = 3;
            break;
        }
        source += sector_size;
        target += sector_size;
        number += iv_step;
    }
    EVP_CIPHER_CTX_free(ctx);
    return status;
}
"""


def cache_folder() -> Path:
    """Return the per-user folder that contains compiled extensions."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trekeys"


def _build_tag() -> str:
    """Return the build folder name: a hash of the C source and the Python ABI."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    digest = hashlib.sha256((CDEF + SOURCE + suffix).encode()).hexdigest()
    return f"xts-{digest[:16]}"


@cache
def load() -> ModuleType | None:
    """Return the compiled module, building it if needed, or None if impossible."""
    folder = cache_folder() / _build_tag()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    library = folder / f"{MODULE_NAME}{suffix}"
    try:
        if not library.exists():
            _build_locked(folder, library)
        module = _import(library)
    except Exception as error:  # noqa: BLE001 - any failure means: use numpy
        logger.warning(
            "compiled AES-XTS backend unavailable (%s), so using the slower numpy path",
            error,
        )
        return None
    logger.info("AES-XTS backend: OpenSSL's EVP through %s", library)
    return module


def _build_locked(folder: Path, library: Path) -> None:
    """Build under an exclusive lock, unless another process built it meanwhile."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (folder / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.exists():
            _compile(folder, library)


def _compile(folder: Path, library: Path) -> None:
    """Emit cffi's C wrapper, compile it in a scratch folder, rename it into place."""
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE_NAME, SOURCE)
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH")

    with tempfile.TemporaryDirectory(dir=folder, prefix="build-") as scratch:
        c_file = Path(scratch) / f"{MODULE_NAME}.c"
        # cffi prints the name of the file it generates, which would clutter stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            ffi.emit_c_code(str(c_file))
        built = Path(scratch) / library.name
        command = [
            compiler,
            "-O2",
            "-shared",
            "-fPIC",
            f"-I{sysconfig.get_paths()['include']}",
            str(c_file),
            "-o",
            str(built),
            f"-l:{LIBCRYPTO}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"compiling failed: {result.stderr.strip()[-300:]}")
        os.replace(built, library)
    logger.info("built the compiled AES-XTS backend in %s", folder)


def _import(library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, library)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault(MODULE_NAME, module)
    return module
