"""Entry point: `python3 -m wrapper run ...` inside the session container."""
import sys

from wrapper.run import main

sys.exit(main(sys.argv[1:]))
