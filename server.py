"""The OpenAI-compatible server: `python server.py --model ...` (the same as `jaxinfer serve ...`).

With no flags it serves the bundled SmolLM2-135M-Instruct on http://127.0.0.1:8000/v1.
"""

import sys

from jaxinfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
