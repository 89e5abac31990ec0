"""Ed25519 keys and signatures over canonical JSON and raw documents.

Private keys are PKCS#8 PEM files (mode 0600, optionally passphrase-encrypted). Public keys
are small TOML files a bank can mail to the coordinator; the fingerprint is what both sides
read aloud over the phone to compare out of band. Next to the Ed25519 signing key, keygen makes
an X25519 key (NAME.x25519.key) for secure aggregation's pairwise masks.
"""

import base64
import json
import os
import stat
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedcli.digest import sha256
from fedcli.errors import FedcliError, InputError, VerificationError
from fedcli.names import check_name

PASSPHRASE_ENV = "FEDCLI_PASSPHRASE"
# Domain separation: a signature over one kind of document never verifies as another.
MANIFEST_DOMAIN = b"fedcli-manifest-v1\n"
SPEC_DOMAIN = b"fedcli-spec-v1\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str = "value") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise FedcliError(f"{what} is not valid base64") from None


def fingerprint(raw_public: bytes) -> str:
    """Short, human-comparable digest of a raw public key: four groups of four hex digits."""
    h = sha256(raw_public)[:16]
    return " ".join(h[i : i + 4] for i in range(0, 16, 4))


@dataclass(frozen=True)
class PublicIdentity:
    name: str
    ed25519: str  # base64 of the 32-byte raw public key
    x25519: str = ""  # base64 X25519 key for secure aggregation masks ("" if none enrolled)

    @property
    def raw(self) -> bytes:
        return unb64(self.ed25519, f"public key of {self.name}")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)

    def key(self) -> Ed25519PublicKey:
        raw = self.raw
        if len(raw) != 32:
            raise FedcliError(f"public key of {self.name} is not a 32-byte Ed25519 key")
        return Ed25519PublicKey.from_public_bytes(raw)

    def mask_key(self):
        """The enrolled X25519 public key (secure aggregation)."""
        if not self.x25519:
            raise FedcliError(f"{self.name} has no X25519 key enrolled (needed for secure aggregation)")
        return x25519_from_text(self.x25519)


def x25519_path_for(key_path: Path) -> Path:
    """NAME.key -> NAME.x25519.key: the mask key lives next to the signing key."""
    return Path(key_path).with_suffix(".x25519.key")


def _write_private(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def generate(name: str, out_dir: Path, passphrase: str | None = None) -> tuple[Path, Path, PublicIdentity]:
    """Write NAME.key and NAME.x25519.key (0600) and NAME.pub; refuse to overwrite a key."""
    check_name(name, "key name")
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    mask_path = x25519_path_for(key_path)
    for p in (key_path, mask_path, pub_path):
        if p.exists():
            raise FedcliError(f"{p} already exists; refusing to overwrite a key (move it away first)")
    private = Ed25519PrivateKey.generate()
    enc = serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    _write_private(key_path, pem)
    mask = generate_x25519()
    _write_private(mask_path, x25519_private_to_pem(mask, passphrase.encode() if passphrase else None))
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ident = PublicIdentity(name=name, ed25519=b64(raw), x25519=x25519_to_text(mask))
    pub_path.write_text(
        f'# fedcli public key. Fingerprint: {ident.fingerprint}\nname = "{name}"\ned25519 = "{ident.ed25519}"\n'
        f'x25519 = "{ident.x25519}"\n'
    )
    return key_path, pub_path, ident


MAX_PRIVATE_KEY_BYTES = 64 * 1024
_prompted: dict[Path, str] = {}  # signing key path -> passphrase typed this run (the mask key reuses it)


def _interactive() -> bool:
    """Whether a person can answer a prompt (never under cron or in a pipe)."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _warn(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def read_private_pem(path: Path) -> bytes:
    """A private key file's bytes, refused when others may read it or it is not a key file."""
    from fedcli.files import read_bounded

    path = Path(path)
    pem = read_bounded(path, MAX_PRIVATE_KEY_BYTES, "private key")
    if pem is None:
        raise InputError(f"private key {path} does not exist")
    if b"-----BEGIN" not in pem:
        hint = f"; pass the private key {path.with_suffix('.key').name}" if b"ed25519" in pem else ""
        raise InputError(f"{path} is not a private key file (PEM){hint}")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise InputError(f"{path.name} is readable by others (mode {mode:04o}): run chmod 600 {path}")
    return pem


def _load_pem(path: Path, pem: bytes, passphrase: str | None, loader, prompt_for: Path):
    """Load a PEM key: the passphrase from the caller, FEDCLI_PASSPHRASE, or a prompt on a terminal."""
    if passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV) or _prompted.get(prompt_for)
    try:
        return loader(pem, passphrase.encode() if passphrase else None)
    except TypeError:
        if passphrase:  # given, but this key is stored in the clear
            _warn(f"{PASSPHRASE_ENV} is set but {path.name} is not encrypted (anyone who can read it can use it)")
            return loader(pem, None)
    except ValueError:
        raise InputError(f"{path} is not a valid key, or the passphrase is wrong") from None
    if not _interactive():
        raise InputError(f"{path} is passphrase-protected: set {PASSPHRASE_ENV} or run from a terminal to be prompted")
    import typer

    passphrase = typer.prompt(f"Passphrase for {path.name}", hide_input=True, err=True)
    try:
        key = loader(pem, passphrase.encode())
    except (TypeError, ValueError):
        raise InputError(f"wrong passphrase for {path}") from None
    _prompted[prompt_for] = passphrase
    return key


def _ed25519_loader(pem: bytes, password: bytes | None):
    return serialization.load_pem_private_key(pem, password=password)


def load_private(path: Path, passphrase: str | None = None) -> tuple[Ed25519PrivateKey, str]:
    """Load a private key and return it with the base64 of its public half."""
    path = Path(path)
    key = _load_pem(path, read_private_pem(path), passphrase, _ed25519_loader, path)
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path} is not an Ed25519 key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, b64(raw)


def _x25519_loader(pem: bytes, password: bytes | None):
    try:
        return x25519_private_from_pem(pem, password)
    except FedcliError as e:  # keep the key-loading errors apart: missing vs wrong passphrase
        text = str(e)
        if "not given" in text or "not encrypted" in text:
            raise TypeError(text) from None
        raise ValueError(text) from None


def load_mask_key(key_path: Path, passphrase: str | None = None):
    """Load the X25519 key that sits next to the signing key at key_path."""
    path = x25519_path_for(key_path)
    if not path.exists():
        raise InputError(
            f"{path} not found: secure aggregation needs the X25519 key `fedcli keygen` makes next to {Path(key_path).name}"
        )
    return _load_pem(path, read_private_pem(path), passphrase, _x25519_loader, Path(key_path))


def read_toml(path: Path, what: str) -> dict:
    """Parse a TOML file, turning a missing file or bad syntax into one clear line."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise FedcliError(f"cannot read {what} {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FedcliError(f"{what} {path} is not valid TOML: {e}") from None


def load_public(path: Path) -> PublicIdentity:
    """Read NAME.pub: a typed document (name, ed25519, x25519); a private key given here is named as such."""
    from fedcli.contract import load_toml, validate
    from fedcli.files import read_bounded
    from fedcli.localdocs import MAX_PUBLIC_KEY_BYTES, PublicKeyFile

    path = Path(path)
    data = read_bounded(path, MAX_PUBLIC_KEY_BYTES, "public key file")
    if data is None:
        raise InputError(f"public key file {path} does not exist")
    if b"PRIVATE KEY-----" in data:
        raise InputError(f"{path.name} is a private key; pass the public key file {path.with_suffix('.pub').name}")
    doc = validate(
        PublicKeyFile,
        load_toml(data, f"public key file {path}", MAX_PUBLIC_KEY_BYTES),
        f"public key file {path}",
        error=InputError,
    )
    ident = PublicIdentity(name=doc.name, ed25519=doc.ed25519, x25519=doc.x25519)
    ident.key()  # validates length and encoding
    if ident.x25519:
        ident.mask_key()
    return ident


def canonical(obj: dict) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_manifest(key: Ed25519PrivateKey, manifest: dict) -> bytes:
    """Return the JSON file content: the manifest plus a signature over its canonical form."""
    if "signature" in manifest:
        raise ValueError("manifest already has a signature")
    sig = key.sign(MANIFEST_DOMAIN + canonical(manifest))
    return canonical({**manifest, "signature": b64(sig)})


MAX_MANIFEST_BYTES = 64 * 1024  # larger than any signed round document fedcli writes


def verify_manifest(data: bytes, signer: PublicIdentity, what: str) -> dict:
    """Check a signed JSON document and return it without its signature (not yet validated).

    Order: size bound, depth bound, parse (contract.load_json), then the signature over the
    canonical form; the caller validates the result into its class (fedcli.documents).
    """
    from fedcli.contract import load_json
    from fedcli.errors import ContractError

    doc = load_json(data, what, MAX_MANIFEST_BYTES)
    if not isinstance(doc, dict) or not isinstance(doc.get("signature"), str):
        raise VerificationError(f"{what}: manifest has no signature")
    try:
        sig = unb64(doc.pop("signature"), f"{what}: signature")
    except FedcliError as e:
        raise VerificationError(str(e)) from None
    try:
        body = canonical(doc)
    except ValueError:  # a number like 1e400 parses to inf: no signer could have produced it
        raise ContractError(f"{what}: holds a number too large to be finite", reason="not-finite") from None
    try:
        signer.key().verify(sig, MANIFEST_DOMAIN + body)
    except (InvalidSignature, ValueError, FedcliError):
        raise VerificationError(f"{what}: signature does not verify with {signer.name}'s key") from None
    return doc


def sign_bytes(key: Ed25519PrivateKey, data: bytes, domain: bytes = SPEC_DOMAIN) -> str:
    return b64(key.sign(domain + data))


def verify_bytes(
    data: bytes, signature_b64: str, signer: PublicIdentity, what: str, domain: bytes = SPEC_DOMAIN
) -> None:
    try:
        signer.key().verify(unb64(signature_b64.strip(), f"{what} signature"), domain + data)
    except (InvalidSignature, ValueError, FedcliError):
        raise VerificationError(f"{what}: signature does not verify with {signer.name}'s key") from None


# --- X25519 mask keys (secure aggregation): formats only; the masks are in secagg/masking.py ---


def generate_x25519() -> X25519PrivateKey:
    """A fresh X25519 key from the OS random source."""
    return X25519PrivateKey.generate()


def x25519_to_text(key: X25519PrivateKey | X25519PublicKey) -> str:
    """The raw 32-byte public key in base64, as it appears in the spec and public-key file."""
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def x25519_from_text(text: str) -> X25519PublicKey:
    """Parse a base64 X25519 public key; one-line error if it is not 32 bytes of base64."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, AttributeError):
        raise FedcliError(f"invalid X25519 public key {text!r}: not base64") from None
    if len(raw) != 32:
        raise FedcliError(f"invalid X25519 public key {text!r}: expected 32 bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def x25519_private_to_pem(key: X25519PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with password when one is given."""
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def x25519_private_from_pem(data: bytes, password: bytes | None = None) -> X25519PrivateKey:
    """Load a PKCS#8 PEM X25519 private key; one-line error for anything else."""
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as e:
        raise FedcliError(f"cannot load X25519 private key: {e}") from None
    if not isinstance(key, X25519PrivateKey):
        raise FedcliError("cannot load X25519 private key: the PEM holds another key type")
    return key
