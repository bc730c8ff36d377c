"""`make up`'s .env: written from .env.example when missing, and every secret compose requires that is empty in it
gets a fresh random value; values already set are never changed. Stdlib only (it runs before the virtualenv)."""
from __future__ import annotations

import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What compose.yaml requires (`${NAME:?...}`), and how each is made.
SECRETS = {
    "JWT_SECRET": lambda: secrets.token_hex(32),
    "CCD_WEBHOOK_SECRET": lambda: secrets.token_hex(32),
    "POSTGRES_PASSWORD": lambda: secrets.token_hex(24),
    "MINIO_ACCESS_KEY": lambda: f"ccd-{secrets.token_hex(8)}",
    "MINIO_SECRET_KEY": lambda: secrets.token_hex(32),
    "FLOWER_BASIC_AUTH": lambda: f"ccd:{secrets.token_hex(16)}",
}


def fill(env_text: str) -> tuple[str, list[str]]:
    """The .env text with each empty or missing secret given a value, and the names that got one."""
    lines, seen, made = env_text.splitlines(), set(), []
    for i, line in enumerate(lines):
        name, sep, value = line.partition("=")
        name = name.strip()
        if sep and not line.lstrip().startswith("#") and name in SECRETS:
            seen.add(name)
            if not value.strip():
                lines[i] = f"{name}={SECRETS[name]()}"
                made.append(name)
    for name in SECRETS:
        if name not in seen:
            lines.append(f"{name}={SECRETS[name]()}")
            made.append(name)
    return "\n".join(lines) + "\n", made


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else ROOT / ".env"
    fresh = not path.exists()
    text, made = fill((ROOT / ".env.example").read_text() if fresh else path.read_text())
    if made or fresh:
        path.write_text(text)
        path.chmod(0o600)
    if fresh:
        print(f"wrote {path.name} from .env.example with new secrets (review the rest of it)")
    elif made:
        print(f"{path.name}: generated {', '.join(made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
