"""`python -m sam --host 0.0.0.0 --port 9090`: serve the interactive SAM backend."""

from backends.server.cli import main
from sam.model import SamBackend

if __name__ == "__main__":
    main(SamBackend, default_port=9090)
