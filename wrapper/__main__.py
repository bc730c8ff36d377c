"""Entry point inside the session container: `python3 -m wrapper run|attach|cancel|mcp|serve ...` (the worker calls
`main` through `python3 -c`, which skips runpy's start-up: see workers/turn_runner.py)."""
import sys


def main(argv: list[str]) -> int:
    """`mcp` serves the ccd MCP server on stdio; `run` (wrapper/run.py), `attach` (wrapper/attach.py) and
    `cancel` (wrapper/cancel.py) share one command line (wrapper/common.py). A command's module is imported
    only when it runs (run.py loads cancel.py only to stop a turn left over from a lost worker), so `attach`
    costs `wrapper run` nothing."""
    if argv[:1] == ["mcp"]:
        from wrapper.mcp import main as serve_mcp

        return serve_mcp(argv[1:])
    if argv[:1] == ["serve"]:  # the container's main process: starts turns the worker asks for (wrapper/serve.py)
        from wrapper.serve import serve

        return serve()
    import os

    from wrapper.common import parse_args

    args = parse_args(argv)
    os.umask(0o077)
    if args.command == "attach":
        from wrapper.attach import attach_turn

        return attach_turn(args)
    if args.command == "cancel":
        from wrapper.cancel import cancel_turn

        return cancel_turn(args)
    from wrapper.run import run_turn

    return run_turn(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
