"""Entry point inside the session container: `python3 -m wrapper run|attach|cancel|mcp ...` (the worker calls
`main` through `python3 -c`, which skips runpy's start-up: see workers/turn_runner.py)."""
import sys


def main(argv: list[str]) -> int:
    """`mcp` serves the ccd MCP server on stdio; `run`, `attach` and `cancel` belong to wrapper.run."""
    if argv[:1] == ["mcp"]:
        from wrapper.mcp import main as serve_mcp

        return serve_mcp(argv[1:])
    from wrapper.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
