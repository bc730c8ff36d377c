"""The `ccd` command line."""
from __future__ import annotations

import argparse
import os
import sys

from client.tokens import mint_token


def cmd_token(args: argparse.Namespace) -> int:
    """Prints a token for --sub, valid for --ttl seconds, signed with JWT_SECRET."""
    secret = os.environ.get("JWT_SECRET", "")
    if not secret:
        print("error: JWT_SECRET is not set; export the server's secret first", file=sys.stderr)
        return 2
    try:
        print(mint_token(secret, args.sub, args.ttl))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccd", description="cc-docker command line")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="mint an API token from JWT_SECRET")
    token.add_argument("--sub", default=os.environ.get("USER") or "dev", help="the token's owner")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
